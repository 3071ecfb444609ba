//! The SnapshotService on loopback port 0, behind a bearer-token interceptor like the
//! coordinator's, with [`Store::grpc`] as the client.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use bytes::Bytes;
use futures::StreamExt;
use segprop_proto::v1::snapshot_service_client::SnapshotServiceClient;
use segprop_proto::v1::{GetBlobRequest, PutBlobChunk};
use segprop_store::grpc::{MAX_CHUNK_BYTES, service};
use segprop_store::{ArtifactKind, Error, Namespace, Store};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Status};

const TOKEN: &str = "s3cret";

struct Harness {
    addr: SocketAddr,
    /// The store behind the service (multipart above 2 MiB, so large Puts stream into parts).
    backing: Store,
    /// The artifact store behind the service (`None`: the service serves snapshots only).
    artifacts: Option<Store>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start() -> Self {
        Self::serve(Store::memory().with_multipart_threshold(2 << 20), None).await
    }

    async fn serve(backing: Store, artifacts: Option<Store>) -> Self {
        let expected = format!("Bearer {TOKEN}");
        let auth = move |request: Request<()>| {
            let presented = request.metadata().get("authorization");
            if presented.is_some_and(|v| v.as_bytes() == expected.as_bytes()) {
                Ok(request)
            } else {
                Err(Status::unauthenticated("wrong or missing bearer token"))
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let router = Server::builder().add_service(InterceptedService::new(
            service(backing.clone(), artifacts.clone()),
            auth,
        ));
        let server = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .unwrap();
        });
        Self {
            addr,
            backing,
            artifacts,
            stop: Some(stop),
            server,
        }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn client(&self, token: Option<&str>) -> Store {
        Store::grpc(self.channel().await, token.map(str::to_string)).unwrap()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.server.await.unwrap();
    }
}

#[tokio::test]
async fn artifacts_namespace_reaches_the_artifact_store_only() {
    let harness = Harness::serve(Store::memory(), Some(Store::memory())).await;
    let client = Store::grpc_namespace(
        harness.channel().await,
        Some(TOKEN.into()),
        Namespace::Artifacts,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("weights.bin"), blob(3 << 20, 9)).unwrap();
    std::fs::write(dir.join("state.yaml"), b"step: 3").unwrap();
    let manifest = client
        .put_artifact("jobs/j/stages/002/attempt-1/state", &dir, "fnv1a64:abc")
        .await
        .unwrap();
    assert_eq!(manifest.kind, ArtifactKind::Dir);
    // Stored in the artifact store, not in the snapshot store.
    let artifacts = harness.artifacts.clone().unwrap();
    assert_eq!(
        artifacts.list_artifacts("jobs/j").await.unwrap(),
        ["jobs/j/stages/002/attempt-1/state"]
    );
    assert!(harness.backing.list("").await.unwrap().is_empty());
    let out = tmp.path().join("fetched");
    let fetched = client
        .get_artifact("jobs/j/stages/002/attempt-1/state", &out)
        .await
        .unwrap();
    assert_eq!(fetched.checksum, "fnv1a64:abc");
    assert_eq!(
        std::fs::read(out.join("weights.bin")).unwrap(),
        blob(3 << 20, 9)
    );
    harness.stop().await;

    // A service without an artifact store says so.
    let harness = Harness::start().await;
    let client = Store::grpc_namespace(
        harness.channel().await,
        Some(TOKEN.into()),
        Namespace::Artifacts,
    )
    .unwrap();
    let err = client.get("jobs/j/x").await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Rpc {
                code: Code::FailedPrecondition,
                ..
            }
        ),
        "{err}"
    );
    harness.stop().await;
}

fn blob(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| ((i * 7 + i / 251) as u8).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn authorized<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    request
}

#[tokio::test]
async fn round_trip_stat_list_and_delete() {
    let harness = Harness::start().await;
    let client = harness.client(Some(TOKEN)).await;

    let big = blob(5 << 20, 1);
    client
        .put("jobs/j/snapshots/depth-001/a", big.clone())
        .await
        .unwrap();
    assert_eq!(
        client.get("jobs/j/snapshots/depth-001/a").await.unwrap(),
        big
    );
    // The server streamed the 5 MiB Put into a multipart upload (threshold 2 MiB).
    let served = harness.backing.stats();
    assert_eq!((served.puts, served.multipart_puts), (1, 1));
    assert_eq!(
        harness
            .backing
            .get("jobs/j/snapshots/depth-001/a")
            .await
            .unwrap(),
        big
    );

    client
        .put("jobs/j/snapshots/depth-001/b", blob(10, 2))
        .await
        .unwrap();
    client.put("jobs/j/empty", Bytes::new()).await.unwrap();
    assert_eq!(client.get("jobs/j/empty").await.unwrap(), Bytes::new());
    assert_eq!(
        client.stat("jobs/j/snapshots/depth-001/b").await.unwrap(),
        Some(10)
    );
    assert_eq!(client.stat("jobs/j/none").await.unwrap(), None);
    assert_eq!(
        client.list("jobs/j/snapshots").await.unwrap(),
        vec![
            ("jobs/j/snapshots/depth-001/a".to_string(), 5 << 20),
            ("jobs/j/snapshots/depth-001/b".to_string(), 10),
        ]
    );

    match client.get("jobs/j/none").await {
        Err(Error::NotFound { key }) => assert_eq!(key, "jobs/j/none"),
        other => panic!("{other:?}"),
    }
    // Bad keys are refused before anything is sent.
    assert!(matches!(
        client.get("../x").await,
        Err(Error::BadKey { .. })
    ));

    client.delete("jobs/j/empty").await.unwrap();
    assert_eq!(client.stat("jobs/j/empty").await.unwrap(), None);
    assert_eq!(
        client
            .delete_prefix("jobs/j/snapshots/depth-001")
            .await
            .unwrap(),
        (2, (5 << 20) + 10)
    );
    assert!(harness.backing.list("").await.unwrap().is_empty());

    let stats = client.stats();
    assert_eq!((stats.puts, stats.gets, stats.not_found), (3, 2, 1));
    assert_eq!(stats.bytes_put, (5 << 20) + 10);
    assert_eq!(stats.deletes, 3);
    harness.stop().await;
}

#[tokio::test]
async fn get_streams_bounded_chunks_and_not_found() {
    let harness = Harness::start().await;
    harness
        .backing
        .put("k", blob((3 << 20) + 5, 3))
        .await
        .unwrap();
    let mut raw = SnapshotServiceClient::new(harness.channel().await);
    let mut chunks = raw
        .get(authorized(GetBlobRequest {
            key: "k".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut sizes = Vec::new();
    let mut totals = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.unwrap();
        sizes.push(chunk.data.len());
        totals.push(chunk.total_bytes);
    }
    assert_eq!(
        sizes,
        [MAX_CHUNK_BYTES, MAX_CHUNK_BYTES, MAX_CHUNK_BYTES, 5]
    );
    assert_eq!(totals, [(3 << 20) + 5, 0, 0, 0]);

    let status = raw
        .get(authorized(GetBlobRequest {
            key: "none".into(),
            ..Default::default()
        }))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::NotFound);
    let status = raw
        .get(authorized(GetBlobRequest {
            key: "a//b".into(),
            ..Default::default()
        }))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    harness.stop().await;
}

#[tokio::test]
async fn wrong_or_missing_token_is_refused() {
    let harness = Harness::start().await;
    for token in [Some("guess"), None] {
        let client = harness.client(token).await;
        match client.put("k", blob(10, 0)).await {
            Err(Error::Rpc { code, .. }) => assert_eq!(code, Code::Unauthenticated),
            other => panic!("{token:?}: {other:?}"),
        }
        assert!(matches!(
            client.get("k").await,
            Err(Error::Rpc {
                code: Code::Unauthenticated,
                ..
            })
        ));
    }
    assert!(harness.backing.list("").await.unwrap().is_empty());
    harness.stop().await;
}

#[tokio::test]
async fn an_interrupted_put_commits_nothing() {
    let harness = Harness::start().await;
    let mut raw = SnapshotServiceClient::new(harness.channel().await);
    let chunk = |first: bool, len: usize| PutBlobChunk {
        key: if first {
            "jobs/j/torn".into()
        } else {
            String::new()
        },
        total_bytes: if first { 4 << 20 } else { 0 },
        data: blob(len, 0),
        ..Default::default()
    };

    // The stream ends after 3 of the 4 announced MiB.
    let short = futures::stream::iter((0..3).map(move |i| chunk(i == 0, 1 << 20)));
    let status = raw.put(authorized(short)).await.err().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("3145728 of 4194304"),
        "{status:?}"
    );

    // More bytes than announced, or an oversized chunk.
    let long = futures::stream::iter((0..5).map(move |i| chunk(i == 0, 1 << 20)));
    let status = raw.put(authorized(long)).await.err().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fat = futures::stream::iter([chunk(true, (1 << 20) + 1)]);
    assert_eq!(
        raw.put(authorized(fat)).await.err().unwrap().code(),
        Code::InvalidArgument
    );

    // The client goes away mid-stream (its task is cancelled) while the server is writing the
    // blob into a staging file of a local store.
    harness.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let harness = Harness::serve(
        Store::local(dir.path())
            .unwrap()
            .with_multipart_threshold(2 << 20),
        None,
    )
    .await;
    let mut raw = SnapshotServiceClient::new(harness.channel().await);
    let (tx, rx) = mpsc::channel(4);
    let call = tokio::spawn(async move { raw.put(authorized(ReceiverStream::new(rx))).await });
    for i in 0..3 {
        tx.send(chunk(i == 0, 1 << 20)).await.unwrap();
    }
    assert!(
        wait_for(|| staged_files(dir.path()) == 1).await,
        "the server never started the upload"
    );
    call.abort();
    let _ = call.await;
    drop(tx);
    assert!(
        wait_for(|| staged_files(dir.path()) == 0).await,
        "the staging file outlived the cancelled Put"
    );

    // A complete Put on the same server succeeds; the torn key never appears.
    let client = harness.client(Some(TOKEN)).await;
    client.put("jobs/j/whole", blob(4 << 20, 5)).await.unwrap();
    assert_eq!(staged_files(dir.path()), 0);
    assert_eq!(
        harness.backing.list("").await.unwrap(),
        vec![("jobs/j/whole".to_string(), 4 << 20)]
    );
    assert!(matches!(
        harness.backing.get("jobs/j/torn").await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(harness.backing.stats().puts, 1);
    harness.stop().await;
}

/// Upload staging files (`name#<n>`) under `dir`.
fn staged_files(dir: &std::path::Path) -> usize {
    let mut count = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.to_string_lossy().contains('#') {
                count += 1;
            }
        }
    }
    count
}

/// Polls `condition` for up to 10 s (real I/O on other threads: no paused clock here).
async fn wait_for(mut condition: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if condition() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

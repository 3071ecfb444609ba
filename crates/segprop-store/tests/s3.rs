//! The S3 backend against a real S3-compatible server: moto (`pip install 'moto[server]'`),
//! started on a free loopback port for this test and killed when it ends.
//!
//! This binary holds a single test: it sets the AWS environment variables before any other
//! thread exists, which is what makes `std::env::set_var` sound here.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use segprop_store::{Error, Store, StoreConfig};

const BUCKET: &str = "segprop-test";

/// A moto server process, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// One plain HTTP/1.1 request; returns the status line.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    Ok(response.lines().next().unwrap_or_default().to_string())
}

fn start_moto() -> Moto {
    let port = free_port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start moto_server ({e}): this test needs a local S3 server; \
                 install it with `pip install 'moto[server]'` so that `moto_server` is on PATH"
            )
        });
    let mut moto = Moto { child, port };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(status) = http(port, "GET", "/")
            && status.starts_with("HTTP/1.1 200")
        {
            break;
        }
        if let Ok(Some(exit)) = moto.child.try_wait() {
            panic!("moto_server exited before answering ({exit}); is port {port} taken?");
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not answer within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // object_store cannot create buckets: moto accepts an unsigned CreateBucket.
    let status = http(port, "PUT", &format!("/{BUCKET}")).unwrap();
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "create bucket: {status}"
    );
    moto
}

fn blob(len: usize, seed: u64) -> Bytes {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

#[test]
#[allow(unsafe_code)]
fn s3_against_moto() {
    let moto = start_moto();
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    // SAFETY: the only test of this binary, run before the tokio runtime starts: no other
    // thread reads the environment concurrently.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::remove_var("AWS_SESSION_TOKEN");
        std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(exercise(&endpoint));
    drop(moto);
}

async fn exercise(endpoint: &str) {
    // The endpoint from AWS_ENDPOINT_URL; plain http needs allow_http.
    let root = Store::open(&StoreConfig {
        url: format!("s3://{BUCKET}"),
        allow_http: true,
        ..StoreConfig::default()
    })
    .unwrap();
    // The endpoint and region from the config, under a key prefix.
    let store = Store::open(&StoreConfig {
        url: format!("s3://{BUCKET}/runs/r1"),
        s3_endpoint: Some(endpoint.to_string()),
        s3_region: Some("us-east-1".into()),
        allow_http: true,
        ..StoreConfig::default()
    })
    .unwrap();
    assert_eq!(store.location(), "s3://segprop-test/runs/r1");

    store.put("jobs/j/a.bin", blob(1000, 1)).await.unwrap();
    assert_eq!(store.get("jobs/j/a.bin").await.unwrap(), blob(1000, 1));
    assert_eq!(store.stat("jobs/j/a.bin").await.unwrap(), Some(1000));
    assert_eq!(store.stat("jobs/j/none").await.unwrap(), None);
    assert!(matches!(
        store.get("jobs/j/none").await,
        Err(Error::NotFound { .. })
    ));
    // The prefix store writes under runs/r1/ in the bucket.
    assert_eq!(
        root.list("").await.unwrap(),
        vec![("runs/r1/jobs/j/a.bin".to_string(), 1000)]
    );

    for i in 0..3 {
        store
            .put(
                &format!("jobs/j/snapshots/depth-001/train-{i}"),
                blob(10, i),
            )
            .await
            .unwrap();
    }
    store.put("jobs/jx", blob(5, 9)).await.unwrap();
    let listed = store.list("jobs/j").await.unwrap();
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert_eq!(listed[0], ("jobs/j/a.bin".to_string(), 1000));
    assert_eq!(
        store.list("jobs/jx").await.unwrap(),
        vec![("jobs/jx".to_string(), 5)]
    );

    // A 20 MiB blob goes up in 8 MiB parts.
    let big = blob(20 << 20, 42);
    store.put("jobs/j/big.bin", big.clone()).await.unwrap();
    assert_eq!(store.get("jobs/j/big.bin").await.unwrap(), big);
    assert_eq!(store.stat("jobs/j/big.bin").await.unwrap(), Some(20 << 20));

    // An interrupted multipart upload is never visible.
    let mut writer = store.put_writer("jobs/j/torn.bin", 20 << 20).await.unwrap();
    writer.write(blob(10 << 20, 7)).await.unwrap();
    assert_eq!(store.stat("jobs/j/torn.bin").await.unwrap(), None);
    writer.abort().await;
    assert!(matches!(
        store.get("jobs/j/torn.bin").await,
        Err(Error::NotFound { .. })
    ));

    store.delete("jobs/jx").await.unwrap();
    assert_eq!(store.stat("jobs/jx").await.unwrap(), None);
    assert_eq!(
        store.delete_prefix("jobs/j/snapshots").await.unwrap(),
        (3, 30)
    );
    assert_eq!(
        store.delete_prefix("").await.unwrap(),
        (2, 1000 + (20 << 20))
    );
    assert!(root.list("").await.unwrap().is_empty());

    let stats = store.stats();
    assert_eq!((stats.puts, stats.multipart_puts), (6, 1), "{stats:?}");
    assert_eq!(stats.bytes_put, 1000 + 30 + 5 + (20 << 20));
    assert_eq!((stats.gets, stats.not_found), (2, 2), "{stats:?}");
    assert_eq!(stats.deletes, 1 + 3 + 2);
}

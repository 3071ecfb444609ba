//! The coordinator's gRPC server: JobService, ClusterService, SnapshotService (the snapshot
//! store, for workers without direct access) and reflection (v1 and v1alpha, so grpcurl and
//! grpcio clients can call it), all behind bearer-token auth, with optional TLS; and
//! `grpc.health.v1.Health` without a token, for probes. With `metrics_listen`, an HTTP server
//! for Prometheus `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use segprop_proto::v1::cluster_service_server::ClusterServiceServer;
use segprop_proto::v1::job_service_server::JobServiceServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::auth::BearerAuth;
use crate::config::CoordConfig;
use crate::service::{Api, Coordinator};

/// A running coordinator.
pub struct Running {
    pub addr: SocketAddr,
    /// The bound `/metrics` address, with `metrics_listen`.
    pub metrics_addr: Option<SocketAddr>,
    pub coordinator: Arc<Coordinator>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    ticker: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting calls and waits for the server to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.ticker.abort();
        self.task.await??;
        Ok(())
    }
}

/// Binds `config.listen`, reloads state and serves until stopped.
pub async fn start(config: CoordConfig) -> anyhow::Result<Running> {
    let token = config.token.clone().ok_or_else(|| {
        anyhow::anyhow!("no token configured: set `token` in the config file or SEGPROP_TOKEN")
    })?;
    let coordinator = Coordinator::open(config.clone())?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(segprop_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(segprop_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // Wide HTTP/2 windows: snapshot blobs stream through the SnapshotService in 1 MiB chunks.
    // One span per call, parented to the caller's `traceparent` (segprop_telemetry::trace).
    let mut builder = Server::builder()
        .trace_fn(segprop_telemetry::trace::server_span)
        .initial_stream_window_size(Some(segprop_store::grpc::STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(segprop_store::grpc::CONNECTION_WINDOW_BYTES));
    if let Some(tls) = &config.tls {
        let cert = std::fs::read(&tls.cert)
            .map_err(|e| anyhow::anyhow!("tls.cert {}: {e}", tls.cert.display()))?;
        let key = std::fs::read(&tls.key)
            .map_err(|e| anyhow::anyhow!("tls.key {}: {e}", tls.key.display()))?;
        builder =
            builder.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?;
    }
    let auth = BearerAuth::new(&token);
    let check = move |req| auth.check(req);
    let router = builder
        .add_service(segprop_telemetry::health::service().await)
        .add_service(InterceptedService::new(
            JobServiceServer::new(Api(coordinator.clone())),
            check.clone(),
        ))
        .add_service(InterceptedService::new(
            ClusterServiceServer::new(Api(coordinator.clone())),
            check.clone(),
        ))
        .add_service(InterceptedService::new(
            segprop_store::grpc::service(
                coordinator.snapshot_store().clone(),
                Some(coordinator.artifact_store().clone()),
            ),
            check.clone(),
        ))
        .add_service(InterceptedService::new(reflection_v1, check.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, check));
    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let c = coordinator.clone();
            Some(segprop_telemetry::metrics::serve(addr, Arc::new(move || c.metrics())).await?)
        }
        None => None,
    };

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tick_coordinator = coordinator.clone();
    let tick_every = Duration::from_millis((config.heartbeat_interval_ms / 4).clamp(20, 250));
    let ticker = tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick_every);
        loop {
            interval.tick().await;
            if let Err(e) = tick_coordinator.tick().await {
                tracing::error!(error = %e, "coordinator tick failed");
            }
        }
    });
    let task = tokio::spawn(router.serve_with_incoming_shutdown(
        // Small replies (assignments) must not wait for Nagle + delayed ACK (~40 ms each).
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        async {
            let _ = rx.await;
        },
    ));
    tracing::info!(%addr, state = %config.state_dir.display(), artifacts = %config.artifact_root.display(), snapshots = coordinator.snapshot_store().location(), artifact_store = coordinator.artifact_store().location(), tls = config.tls.is_some(), "coordinator listening");
    Ok(Running {
        addr,
        metrics_addr,
        coordinator,
        shutdown: Some(tx),
        task,
        ticker,
    })
}

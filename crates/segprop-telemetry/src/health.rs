//! `grpc.health.v1.Health`: answers SERVING for the empty service name (the whole process) while
//! the process runs. It carries no data and needs no token, so probes can call it.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::health_server::{Health, HealthServer};

/// The health service, reporting SERVING for `""`.
pub async fn service() -> HealthServer<impl Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    service
}

/// Serves the health service alone on `addr` (the worker, which has no other server). Returns
/// the bound address; the server runs until the process ends.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--health-listen {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let router = Server::builder().add_service(service().await);
    tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
        {
            tracing::error!(error = %e, "gRPC health server stopped");
        }
    });
    tracing::info!(addr = %bound, "gRPC health service listening");
    Ok(bound)
}

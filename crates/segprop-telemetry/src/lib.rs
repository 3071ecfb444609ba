//! What operators see of a segprop daemon (docs/operations.md, "What to watch"):
//!
//! - [`metrics`]: the Prometheus text exposition, written by hand (a few families, rendered
//!   from the daemon's own state at scrape time), and an HTTP server for `/metrics` and
//!   `/healthz`;
//! - [`health`]: the standard `grpc.health.v1.Health` service, for Kubernetes' native gRPC
//!   probes, standalone (the worker) or next to other services (the coordinator);
//! - [`trace`]: logs on stderr and OTLP trace export, with the W3C trace context carried in
//!   gRPC metadata so one job is one trace across the CLI, the coordinator and the workers.

pub mod health;
pub mod metrics;
pub mod outgoing;
pub mod trace;

//! segprop-coordinator: the control plane's brain and the `segprop-coord` CLI.
//!
//! - [`service::Coordinator`] owns jobs, tasks and leases (decided by the pure
//!   [`segprop_core::sched`]), persists them in redb ([`store`], committed outside the
//!   state lock: [`writer`]) and serves `JobService` and `ClusterService` ([`server`])
//!   behind bearer-token auth ([`auth`]); workers' requests are decoded and checked into
//!   [`request`] types by [`convert`].
//! - [`client`] is what the CLI uses: connect, submit, watch with progress bars.
//!
//! It never links burn: it builds fast and runs on a small CPU pod.

pub mod auth;
pub mod client;
pub mod config;
pub mod convert;
pub mod error;
pub mod local;
pub mod metrics;
pub mod plan;
pub mod request;
pub mod server;
pub mod service;
pub mod store;
pub mod sweep;
pub mod writer;

pub use config::CoordConfig;

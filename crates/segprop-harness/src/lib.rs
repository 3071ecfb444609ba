//! Starts the project's binaries as real processes on loopback, for the end-to-end tests
//! (`tests/`, package `segprop-e2e`) and the benches that drive a cluster (`segprop-bench
//! snapcheck-cluster`, `chaos`, `loadtest`):
//!
//! - [`Binaries`]: where `segprop-coord`, `segprop-worker` and `segprop-bench` are, either built
//!   with cargo on first use (tests) or found next to the running executable (benches);
//! - [`CoordinatorCommand`]: `segprop-coord serve` with its state under a directory, settings
//!   from the environment and an optional config file; [`Coordinator`] is the running child and
//!   the address it printed, with the job CLI pointed at it;
//! - [`WorkerCommand`]: `segprop-worker serve` joined to a coordinator;
//! - [`ChildCommand`]: the settings both builders share (environment variables, [`Log`], log
//!   level), kept in their [`ChildOptions`];
//! - [`Process`]: a child that is SIGKILLed and reaped on drop, so a failed test or bench leaves
//!   no daemon behind;
//! - [`authorized`] and [`get_job_request`]: requests carrying the bearer token.
//!
//! This is test and bench support: its errors are `anyhow` errors for the caller to print. It
//! talks to the processes only through their command lines, output and gRPC messages, so it
//! must not depend on burn, on the engine or the model crates, or on the coordinator's and the
//! worker's libraries.

mod binaries;
mod coordinator;
mod process;
mod worker;

pub use binaries::{Binaries, COORDINATOR, WORKER};
pub use coordinator::{Coordinator, CoordinatorCommand, listen_address};
pub use process::{ChildCommand, ChildOptions, Log, Process};
pub use worker::WorkerCommand;

use segprop_proto::v1 as pb;

/// `message` as a request with `authorization: Bearer <token>`.
pub fn authorized<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|e| anyhow::anyhow!("the token cannot be sent as gRPC metadata: {e}"))?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// A `GetJob` request for `job_id` carrying `token`.
pub fn get_job_request(
    job_id: &str,
    token: &str,
) -> anyhow::Result<tonic::Request<pb::GetJobRequest>> {
    authorized(
        pb::GetJobRequest {
            job_id: job_id.to_string(),
        },
        token,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by tests that write a script and run it: a child forked by another test thread
    /// while the script is open for writing would make its exec fail with ETXTBSY.
    pub(crate) static SPAWNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn requests_carry_the_bearer_token() {
        let request = get_job_request("job-1", "secret").unwrap();
        assert_eq!(request.get_ref().job_id, "job-1");
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer secret"
        );
        assert!(authorized((), "bad\ntoken").is_err());
    }
}

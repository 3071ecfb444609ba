//! Bearer-token authentication of every RPC (JobService, ClusterService and reflection).

use std::sync::Arc;

use tonic::{Request, Status};

/// Checks `authorization: Bearer <token>`; a request without it, or with another token, is
/// refused with UNAUTHENTICATED and logged (it reaches no service, so it changes nothing).
#[derive(Clone)]
pub struct BearerAuth {
    expected: Arc<[u8]>,
}

impl BearerAuth {
    pub fn new(token: &str) -> Self {
        Self {
            expected: format!("Bearer {token}").into_bytes().into(),
        }
    }

    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(presented, &self.expected) {
            return Ok(request);
        }
        let why = if presented.is_empty() {
            "no bearer token"
        } else {
            "wrong bearer token"
        };
        tracing::warn!(peer = ?request.remote_addr(), why, "request rejected (UNAUTHENTICATED)");
        Err(Status::unauthenticated(format!(
            "{why}: send `authorization: Bearer <token>` with the coordinator's token"
        )))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Adds the bearer token and the trace context to every outgoing request (the CLI's client;
/// the worker daemon and the snapshot store's client use the same type).
pub use segprop_telemetry::outgoing::AttachToken;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_passes() {
        let auth = BearerAuth::new("s3cret");
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(auth.check(ok).is_ok());
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert("authorization", "Bearer s3cre".parse().unwrap());
        assert_eq!(
            auth.check(wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.check(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}

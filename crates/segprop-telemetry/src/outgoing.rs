//! What every outgoing call of a segprop client carries: the coordinator's bearer token
//! (`authorization: Bearer <token>`) and the caller's trace context (`traceparent`). One type
//! for the CLI, the worker daemon and the snapshot store's gRPC client, as a tonic interceptor
//! or applied to one request.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

/// The headers of an outgoing call: the bearer token (when the client has one) and the trace
/// context.
#[derive(Clone, Debug, Default)]
pub struct AttachToken {
    authorization: Option<MetadataValue<Ascii>>,
}

impl AttachToken {
    /// The token `token`; an error when it cannot be sent as a header (not printable ASCII).
    pub fn new(token: &str) -> Result<Self, String> {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| "token: must be printable ASCII".to_string())?;
        Ok(Self {
            authorization: Some(value),
        })
    }

    /// `token` if given, else no `authorization` header (trace context only).
    pub fn optional(token: Option<&str>) -> Result<Self, String> {
        token.map_or_else(|| Ok(Self::default()), Self::new)
    }

    /// `request` with the headers.
    pub fn apply<T>(&self, mut request: Request<T>) -> Request<T> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        crate::trace::inject(request.metadata_mut());
        request
    }
}

impl tonic::service::Interceptor for AttachToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        Ok(self.apply(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_travels_as_a_bearer_header() {
        let request = AttachToken::new("s3cret").unwrap().apply(Request::new(()));
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        let bare = AttachToken::optional(None).unwrap().apply(Request::new(()));
        assert!(bare.metadata().get("authorization").is_none());
        assert!(
            AttachToken::new("bad\ntoken")
                .unwrap_err()
                .contains("printable ASCII")
        );
    }
}

//! Why a coordinator call was refused or failed ([`CoordError`]), and the one place such an
//! error becomes a gRPC status (`From<CoordError> for Status`): the domain methods return
//! `CoordError`, the tonic handlers (`api.rs`) convert.

use tonic::Status;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The job spec does not parse, validate, resolve its files, or fit the workers (pre-flight).
    #[error("{0}")]
    Spec(String),
    /// A request field is missing or out of range.
    #[error("{field}: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
    /// No job with this id, running or ended.
    #[error("no job {0}")]
    NoJob(String),
    /// The worker speaks another protocol version.
    #[error("worker speaks protocol version {worker}, this coordinator speaks {coordinator}")]
    Protocol { worker: u32, coordinator: u32 },
    /// A report or rendezvous for something that is not the current attempt leased to the
    /// caller (fenced off: the job ended, the epoch moved on, another worker holds the lease).
    #[error("{0}")]
    Fenced(String),
    /// Rank 0 of an attempt already published another communicator id.
    #[error("{0}")]
    AlreadyPublished(String),
    /// Rank 0 of an attempt did not publish its communicator id in time.
    #[error("{0}")]
    RendezvousTimeout(String),
    /// The state store could not save a transition: nothing was acknowledged.
    #[error("coordinator state could not be saved: {0}")]
    Persist(#[from] StoreError),
    /// A bug or an impossible state.
    #[error("{0}")]
    Internal(String),
}

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Self {
        let message = e.to_string();
        match e {
            CoordError::Spec(_) | CoordError::Field { .. } => Status::invalid_argument(message),
            CoordError::NoJob(_) => Status::not_found(message),
            CoordError::Protocol { .. } | CoordError::Fenced(_) => {
                Status::failed_precondition(message)
            }
            CoordError::AlreadyPublished(_) => Status::already_exists(message),
            CoordError::RendezvousTimeout(_) => Status::deadline_exceeded(message),
            CoordError::Persist(_) | CoordError::Internal(_) => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_error_has_its_code_and_message() {
        let cases = [
            (
                CoordError::Spec("seed: bad".into()),
                Code::InvalidArgument,
                "seed: bad",
            ),
            (
                CoordError::Field {
                    field: "outcome",
                    message: "missing".into(),
                },
                Code::InvalidArgument,
                "outcome: missing",
            ),
            (CoordError::NoJob("j1".into()), Code::NotFound, "no job j1"),
            (
                CoordError::Protocol {
                    worker: 1,
                    coordinator: 2,
                },
                Code::FailedPrecondition,
                "worker speaks protocol version 1, this coordinator speaks 2",
            ),
            (
                CoordError::Fenced("x".into()),
                Code::FailedPrecondition,
                "x",
            ),
            (
                CoordError::AlreadyPublished("y".into()),
                Code::AlreadyExists,
                "y",
            ),
            (
                CoordError::RendezvousTimeout("z".into()),
                Code::DeadlineExceeded,
                "z",
            ),
            (CoordError::Internal("w".into()), Code::Internal, "w"),
        ];
        for (error, code, message) in cases {
            let status = Status::from(error);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }
}

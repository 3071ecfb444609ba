//! What workers ask of the coordinator, checked on arrival (`convert.rs` decodes the wire into
//! these): the service's methods take them, never a prost message; and what they are told.

use std::time::Duration;

pub use segprop_core::sched::Attempt;
use segprop_core::sched::{Backend, Checkpoint, Dispatch, Outcome, WorkerId};
use segprop_proto::v1 as pb;

/// A worker announcing itself (again, after a coordinator restart, with the task it runs).
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub name: String,
    pub backend: Backend,
    /// Devices offered (at least 1).
    pub devices: u32,
    /// The smallest device's memory (0: not reported).
    pub device_bytes: u64,
    pub host_bytes: u64,
    /// Attempts the worker is running, to be adopted if still current.
    pub running: Vec<Attempt>,
}

/// A worker's heartbeat: its running attempts (renewed) and whether it can take a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub worker_id: WorkerId,
    pub free_slots: u32,
    pub running: Vec<Running>,
}

/// One running attempt as a heartbeat reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    pub attempt: Attempt,
    /// The newest checkpoint the attempt stored, if any.
    pub checkpoint: Option<Checkpoint>,
    /// Progress since the last heartbeat, relayed to watchers as it came.
    pub events: Vec<pb::Progress>,
}

/// A worker's report of an attempt's end.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub worker_id: WorkerId,
    pub attempt: Attempt,
    pub outcome: Outcome,
}

/// A rank of a gang's attempt at the communicator rendezvous: rank 0 publishes `unique_id`
/// (non-empty), the others send none and wait up to `wait` for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendezvous {
    pub worker_id: WorkerId,
    pub attempt: Attempt,
    pub rank: u32,
    pub world: u32,
    pub unique_id: Vec<u8>,
    pub wait: Duration,
}

/// What a registered worker is told: its id and the cluster's timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub worker_id: WorkerId,
    pub heartbeat_interval_ms: u64,
    pub lease_ms: u64,
    /// Where the worker's artifact store is (an absolute path or URL).
    pub artifact_root: String,
}

/// What a heartbeat is answered: tasks to start, attempts to stop (the job was cancelled or the
/// lease lost), or that the coordinator does not know the worker (it restarted).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeartbeatReply {
    pub dispatches: Vec<Dispatch>,
    pub cancel: Vec<Attempt>,
    pub reregister: bool,
}

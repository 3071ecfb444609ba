//! segprop-proto: the control plane's protocol, generated from `proto/segprop/v1/` (package
//! `segprop.v1`), and the conversions of the domain types both ends share ([`domain`]);
//! everything else is converted in the crate that uses it.

#![allow(clippy::all, clippy::pedantic, unused_qualifications)]

pub mod v1 {
    tonic::include_proto!("segprop.v1");
}

pub mod domain;

/// The encoded file descriptor set of every segprop proto file (for gRPC reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/segprop_descriptor.bin"));

/// The protocol version a worker announces in `RegisterWorker`; the coordinator refuses others.
/// 2: a task's success carries its typed `TaskResult`.
pub const PROTOCOL_VERSION: u32 = 2;

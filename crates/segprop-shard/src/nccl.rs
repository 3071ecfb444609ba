//! NCCL for the GPUs of one host (feature `nccl`, cudarc's `nccl` module; libnccl is loaded at
//! run time, so building needs no CUDA).
//!
//! Rendezvous: ranks in one process join with one `ncclCommInitAll` ([`NcclCollective::group`]).
//! Ranks in different processes: rank 0 makes an [`NcclId`], publishes its 128 bytes
//! ([`NcclId::to_bytes`]) through the coordinator's `ClusterService/Rendezvous` for its task
//! attempt, every other rank receives them there, and each builds its [`NcclCollective`] with
//! [`NcclCollective::new`].
//!
//! Two ways in: the [`Collective`] trait's host buffers are staged through device memory (copy
//! in, collective, copy out), for the small calls (the gradient norm, barriers) and checkpoint
//! gathers; FSDP units on burn-cuda with `sharding.offload: none` hand their tensors' device
//! buffers to [`DeviceBuffers`], no host copy: the units' all-gathers and
//! gradient reduce-scatters, every step.
//!
//! Deadline: the copy, the collective and an event are queued on the rank's stream and the event
//! is polled. Past the deadline the call fails with [`CollectiveError::Timeout`] (NCCL does not
//! say which peer is missing), the handle is poisoned, and dropping it aborts the communicator
//! (`ncclCommAbort`), which releases the kernels still waiting for the missing peer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::collective::{
    Collective, CollectiveError, CollectiveStats, DeviceBuffers, DeviceWords, Op, check_sizes,
};

/// The unique id of an NCCL communicator: 128 opaque bytes every rank must receive.
#[derive(Clone, PartialEq, Eq)]
pub struct NcclId([u8; 128]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id (needs libnccl; call it on one rank only).
    pub fn new() -> Result<Self, CollectiveError> {
        let id =
            Id::new().map_err(|e| backend(Op::Barrier, 0, format!("ncclGetUniqueId: {e:?}")))?;
        let mut bytes = [0u8; 128];
        for (b, c) in bytes.iter_mut().zip(id.internal()) {
            *b = *c as u8;
        }
        Ok(Self(bytes))
    }

    pub fn to_bytes(&self) -> [u8; 128] {
        self.0
    }

    /// The id from the bytes another rank sent.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let array: [u8; 128] = bytes
            .try_into()
            .map_err(|_| format!("an NCCL id has 128 bytes, got {}", bytes.len()))?;
        Ok(Self(array))
    }

    fn to_id(&self) -> Id {
        Id::uninit(self.0.map(|b| b as std::ffi::c_char))
    }
}

fn backend(op: Op, seq: u64, message: String) -> CollectiveError {
    CollectiveError::Backend { op, seq, message }
}

/// One rank of an NCCL communicator, on one CUDA device.
pub struct NcclCollective {
    comm: Comm,
    stream: Arc<CudaStream>,
    deadline: Duration,
    seq: u64,
    stats: CollectiveStats,
    poisoned: Option<CollectiveError>,
}

impl NcclCollective {
    /// Joins the communicator `id` as `rank` of `world` on CUDA device `device`. Blocks until
    /// every rank has joined (NCCL's own initialisation).
    pub fn new(
        device: usize,
        rank: usize,
        world: usize,
        id: &NcclId,
        deadline: Duration,
    ) -> Result<Self, CollectiveError> {
        let init = |e: String| {
            backend(
                Op::Barrier,
                0,
                format!("init of rank {rank}/{world} on cuda:{device}: {e}"),
            )
        };
        let ctx = CudaContext::new(device).map_err(|e| init(format!("{e:?}")))?;
        let stream = ctx.new_stream().map_err(|e| init(format!("{e:?}")))?;
        let comm = Comm::from_rank(stream.clone(), rank, world, id.to_id())
            .map_err(|e| init(format!("ncclCommInitRank: {e:?}")))?;
        Ok(Self::joined(comm, stream, deadline))
    }

    /// A rank around its initialised communicator.
    fn joined(comm: Comm, stream: Arc<CudaStream>, deadline: Duration) -> Self {
        Self {
            comm,
            stream,
            deadline,
            seq: 0,
            stats: CollectiveStats::default(),
            poisoned: None,
        }
    }

    /// The ranks of a gang inside one process, rank `r` on CUDA device `devices[r]`, joined by
    /// one `ncclCommInitAll` from the calling thread: no rendezvous, so no rank can hang in
    /// initialisation waiting for a peer that failed before joining (the trap of
    /// `ncclCommInitRank` across threads). Each collective then moves to its rank's thread.
    pub fn group(devices: &[usize], deadline: Duration) -> Result<Vec<Self>, CollectiveError> {
        let world = devices.len();
        let init = |e: String| backend(Op::Barrier, 0, format!("init of {world} ranks: {e}"));
        let mut streams = Vec::with_capacity(world);
        for &device in devices {
            let ctx =
                CudaContext::new(device).map_err(|e| init(format!("cuda:{device}: {e:?}")))?;
            streams.push(
                ctx.new_stream()
                    .map_err(|e| init(format!("cuda:{device}: {e:?}")))?,
            );
        }
        let comms = Comm::from_devices(streams.clone())
            .map_err(|e| init(format!("ncclCommInitAll on {devices:?}: {e:?}")))?;
        Ok(comms
            .into_iter()
            .zip(streams)
            .map(|(comm, stream)| Self::joined(comm, stream, deadline))
            .collect())
    }

    /// The communicator, for collectives on device buffers.
    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// Stages `input` on the device, runs `launch` on it (it returns the output buffer), waits
    /// for completion within the deadline and copies the output back.
    fn run(
        &mut self,
        op: Op,
        input: &[f32],
        full_elems: usize,
        launch: impl FnOnce(&Comm, &Arc<CudaStream>, &CudaSlice<f32>) -> Result<CudaSlice<f32>, String>,
    ) -> Result<Vec<f32>, CollectiveError> {
        let mut output = None;
        self.guarded(op, full_elems, |comm, stream, seq| {
            let device_in = stream
                .clone_htod(input)
                .map_err(|e| backend(op, seq, format!("copy to device: {e:?}")))?;
            output = Some(launch(comm, stream, &device_in).map_err(|m| backend(op, seq, m))?);
            Ok(())
        })?;
        let output = output.expect("launched");
        self.stream.clone_dtoh(&output).map_err(|e| {
            let e = backend(op, self.seq - 1, format!("copy to host: {e:?}"));
            self.poisoned = Some(e.clone());
            e
        })
    }

    /// Queues `launch` on the rank's stream and waits for it within the deadline: the sequence
    /// number, the statistics, and poisoning on any failure.
    fn guarded(
        &mut self,
        op: Op,
        full_elems: usize,
        launch: impl FnOnce(&Comm, &Arc<CudaStream>, u64) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        let seq = self.seq;
        self.seq += 1;
        let started = Instant::now();
        // The communication thread may not have the device's context current yet (NCCL and
        // the event need it); binding is cheap when it already is.
        let bound = self
            .stream
            .context()
            .bind_to_thread()
            .map_err(|e| backend(op, seq, format!("bind the CUDA context: {e:?}")));
        let result = bound
            .and_then(|()| launch(&self.comm, &self.stream, seq))
            .and_then(|()| {
                let done = self
                    .stream
                    .record_event(None)
                    .map_err(|e| backend(op, seq, format!("record event: {e:?}")))?;
                loop {
                    match done.try_is_complete() {
                        Ok(true) => return Ok(()),
                        Ok(false) => {}
                        Err(e) => return Err(backend(op, seq, format!("{e:?}"))),
                    }
                    if started.elapsed() > self.deadline {
                        return Err(CollectiveError::Timeout {
                            op,
                            seq,
                            waited_ms: started.elapsed().as_millis() as u64,
                            missing: Vec::new(),
                            world: self.comm.world_size(),
                        });
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
        match result {
            Ok(()) => {
                self.stats.record(op, full_elems, self.comm.world_size());
                Ok(())
            }
            Err(e) => {
                tracing::warn!(rank = self.comm.rank(), error = %e, "NCCL collective failed: communicator poisoned");
                self.poisoned = Some(e.clone());
                Err(e)
            }
        }
    }
}

/// A device buffer the collective does not own (a burn-cuda tensor's), as cudarc's NCCL calls
/// take it. The caller has synchronized the compute stream that wrote it, and keeps it alive
/// until the call completes, so there is nothing to order on drop.
struct Borrowed<'a> {
    words: DeviceWords,
    stream: &'a Arc<CudaStream>,
}

impl<'a> Borrowed<'a> {
    /// A collective's input and output buffers, both on the communicator's stream.
    fn pair(send: DeviceWords, recv: DeviceWords, stream: &'a Arc<CudaStream>) -> (Self, Self) {
        (
            Self {
                words: send,
                stream,
            },
            Self {
                words: recv,
                stream,
            },
        )
    }
}

impl cudarc::driver::DeviceSlice<f32> for Borrowed<'_> {
    fn len(&self) -> usize {
        self.words.words
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }
}

impl cudarc::driver::DevicePtr<f32> for Borrowed<'_> {
    fn device_ptr<'a>(
        &'a self,
        _stream: &'a CudaStream,
    ) -> (
        cudarc::driver::sys::CUdeviceptr,
        cudarc::driver::SyncOnDrop<'a>,
    ) {
        (self.words.ptr, cudarc::driver::SyncOnDrop::Sync(None))
    }
}

impl cudarc::driver::DevicePtrMut<f32> for Borrowed<'_> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (
        cudarc::driver::sys::CUdeviceptr,
        cudarc::driver::SyncOnDrop<'a>,
    ) {
        (self.words.ptr, cudarc::driver::SyncOnDrop::Sync(None))
    }
}

impl DeviceBuffers for NcclCollective {
    fn all_gather(&mut self, send: DeviceWords, recv: DeviceWords) -> Result<(), CollectiveError> {
        let world = self.world_size();
        check_sizes(Op::AllGather, world, send.words, recv.words)?;
        self.guarded(Op::AllGather, recv.words, |comm, stream, seq| {
            let (input, mut output) = Borrowed::pair(send, recv, stream);
            comm.all_gather(&input, &mut output)
                .map(drop)
                .map_err(|e| backend(Op::AllGather, seq, nccl_error("ncclAllGather", e)))
        })
    }

    fn reduce_scatter(
        &mut self,
        send: DeviceWords,
        recv: DeviceWords,
    ) -> Result<(), CollectiveError> {
        let world = self.world_size();
        check_sizes(Op::ReduceScatter, world, send.words, recv.words)?;
        self.guarded(Op::ReduceScatter, send.words, |comm, stream, seq| {
            let (input, mut output) = Borrowed::pair(send, recv, stream);
            comm.reduce_scatter(&input, &mut output, &ReduceOp::Sum)
                .map(drop)
                .map_err(|e| backend(Op::ReduceScatter, seq, nccl_error("ncclReduceScatter", e)))
        })
    }
}

/// The device buffer of a burn-cuda tensor, for [`DeviceBuffers`]: `None` for a tensor of any
/// other backend, or one that is not a contiguous whole number of 4-byte words.
pub(crate) fn device_words<B: burn::tensor::backend::Backend>(
    tensor: &burn::tensor::Tensor<B, 1>,
) -> Option<DeviceWords> {
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::cuda::CudaRuntime;
    let primitive = tensor.clone().into_primitive().tensor();
    let cube = (&primitive as &dyn std::any::Any).downcast_ref::<CubeTensor<CudaRuntime>>()?;
    let bytes = tensor.dims()[0] * tensor.dtype().size();
    if !cube.is_contiguous() || !bytes.is_multiple_of(4) {
        return None;
    }
    let resource = cube.client.get_resource(cube.handle.clone()).ok()?;
    let resource = resource.resource();
    (resource.size as usize >= bytes).then_some(DeviceWords {
        ptr: resource.ptr,
        words: bytes / 4,
    })
}

// SAFETY: an `NcclCollective` owns its communicator and uses it only through `&mut self`, so
// one thread at a time, which is all NCCL asks of a communicator (it need not stay on the thread
// that created it; `ncclCommInitAll` creates every rank's on one thread by design). Its stream is
// `Send + Sync` already; the raw `ncclComm_t` inside cudarc's `Comm` is what lacks the marker.
#[allow(unsafe_code)]
unsafe impl Send for NcclCollective {}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> String {
    format!("{what}: {e:?}")
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CollectiveError> {
        let world = self.world_size();
        check_sizes(Op::AllGather, world, send.len(), recv.len())?;
        let out_len = recv.len();
        let out = self.run(Op::AllGather, send, out_len, |comm, stream, input| {
            let mut out = stream
                .alloc_zeros::<f32>(out_len)
                .map_err(|e| nccl_error("alloc", e))?;
            comm.all_gather(input, &mut out)
                .map_err(|e| nccl_error("ncclAllGather", e))?;
            Ok(out)
        })?;
        recv.copy_from_slice(&out);
        Ok(())
    }

    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CollectiveError> {
        let world = self.world_size();
        check_sizes(Op::ReduceScatter, world, send.len(), recv.len())?;
        let out_len = recv.len();
        let out = self.run(
            Op::ReduceScatter,
            send,
            send.len(),
            |comm, stream, input| {
                let mut out = stream
                    .alloc_zeros::<f32>(out_len)
                    .map_err(|e| nccl_error("alloc", e))?;
                comm.reduce_scatter(input, &mut out, &ReduceOp::Sum)
                    .map_err(|e| nccl_error("ncclReduceScatter", e))?;
                Ok(out)
            },
        )?;
        recv.copy_from_slice(&out);
        Ok(())
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let len = buf.len();
        let out = self.run(Op::AllReduce, buf, len, |comm, stream, input| {
            let mut out = stream
                .alloc_zeros::<f32>(len)
                .map_err(|e| nccl_error("alloc", e))?;
            comm.all_reduce(input, &mut out, &ReduceOp::Sum)
                .map_err(|e| nccl_error("ncclAllReduce", e))?;
            Ok(out)
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let world = self.world_size();
        if root >= world {
            return Err(CollectiveError::Usage {
                op: Op::Broadcast,
                message: format!("root {root} is not a rank of a group of {world}"),
            });
        }
        let len = buf.len();
        let out = self.run(Op::Broadcast, buf, len, |comm, stream, input| {
            let mut out = stream
                .alloc_zeros::<f32>(len)
                .map_err(|e| nccl_error("alloc", e))?;
            comm.broadcast(Some(input), &mut out, root as i32)
                .map_err(|e| nccl_error("ncclBroadcast", e))?;
            Ok(out)
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // NCCL has no barrier: an all-reduce of one element is the usual stand-in.
        let mut one = [0.0f32];
        self.run(Op::Barrier, &one.clone(), 0, |comm, stream, input| {
            let mut out = stream
                .alloc_zeros::<f32>(1)
                .map_err(|e| nccl_error("alloc", e))?;
            comm.all_reduce(input, &mut out, &ReduceOp::Sum)
                .map_err(|e| nccl_error("ncclAllReduce (barrier)", e))?;
            Ok(out)
        })
        .map(|out| one.copy_from_slice(&out))
    }

    fn stats(&self) -> CollectiveStats {
        self.stats
    }

    fn device_buffers(&mut self) -> Option<&mut dyn DeviceBuffers> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_as_bytes() {
        let bytes: Vec<u8> = (0..128u8).collect();
        let id = NcclId::from_bytes(&bytes).unwrap();
        assert_eq!(id.to_bytes().to_vec(), bytes);
        assert!(
            NcclId::from_bytes(&bytes[..5])
                .unwrap_err()
                .contains("128 bytes")
        );
    }
}

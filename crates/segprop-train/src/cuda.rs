//! The CUDA backend (feature `cuda`): burn-cuda with autodiff, on device `cuda:0`.
//!
//! Touching a CUDA device without a driver panics inside cudarc, so the driver is probed first
//! and a missing one is reported as an error.

use segprop_core::JobSpec;

use crate::error::TrainError;
use crate::metrics::{RunSummary, TrainObserver};
use crate::run::{RunOptions, run_job};

pub type CudaBackend = burn::backend::Autodiff<burn::backend::Cuda>;

/// Runs `spec` on the first CUDA device.
pub fn run_job_cuda(
    spec: JobSpec,
    options: &RunOptions,
    observer: &mut dyn TrainObserver,
) -> Result<RunSummary, TrainError> {
    if !cuda_available() {
        return Err(TrainError::NoDevice {
            backend: "cuda".into(),
        });
    }
    let device = burn::backend::cuda::CudaDevice::new(0);
    run_job::<CudaBackend>(spec, device, options, observer)
}

/// Whether a CUDA driver library can be loaded on this machine.
#[allow(unsafe_code)]
pub fn cuda_available() -> bool {
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made through it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    /// The product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total device memory in bytes.
    pub total_bytes: u64,
}

/// Every CUDA device the driver shows this process (after `CUDA_VISIBLE_DEVICES`), with its
/// total memory: what a worker offers the coordinator's pre-flight check. Creates no context, so
/// it costs no device memory.
#[allow(unsafe_code)]
pub fn devices() -> Result<Vec<DeviceInfo>, String> {
    use cudarc::driver::result;

    if !cuda_available() {
        return Err("no CUDA driver library (libcuda) on this machine".into());
    }
    result::init().map_err(|e| format!("cuInit: {e}"))?;
    let count = result::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
    (0..count)
        .map(|ordinal| {
            let device =
                result::device::get(ordinal).map_err(|e| format!("cuDeviceGet({ordinal}): {e}"))?;
            let name = result::device::get_name(device)
                .map_err(|e| format!("cuDeviceGetName({ordinal}): {e}"))?;
            // SAFETY: `device` is a handle the driver just returned for a valid ordinal.
            let total = unsafe { result::device::total_mem(device) }
                .map_err(|e| format!("cuDeviceTotalMem({ordinal}): {e}"))?;
            Ok(DeviceInfo {
                ordinal: usize::try_from(ordinal).unwrap_or(0),
                name,
                total_bytes: total as u64,
            })
        })
        .collect()
}

/// Reads how much memory is in use on each of a worker's GPUs (`cuMemGetInfo`), for `/metrics`.
/// It holds each device's primary context, the one burn-cuda trains in, so it adds no context
/// of its own beyond what training creates anyway.
pub struct DeviceMemoryProbe {
    contexts: Vec<std::sync::Arc<cudarc::driver::CudaContext>>,
}

impl DeviceMemoryProbe {
    /// Retains the primary contexts of devices `0..count`.
    pub fn new(count: usize) -> Result<Self, String> {
        if !cuda_available() {
            return Err("no CUDA driver library (libcuda) on this machine".into());
        }
        let contexts = (0..count)
            .map(|ordinal| {
                cudarc::driver::CudaContext::new(ordinal)
                    .map_err(|e| format!("cuda:{ordinal}: cannot open its context: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { contexts })
    }

    /// Bytes in use (total − free) per device, in device order; a device whose query fails is
    /// left out.
    pub fn used_bytes(&self) -> Vec<(usize, u64)> {
        self.contexts
            .iter()
            .filter_map(|ctx| {
                let (free, total) = ctx.mem_get_info().ok()?;
                Some((ctx.ordinal(), total.saturating_sub(free) as u64))
            })
            .collect()
    }
}

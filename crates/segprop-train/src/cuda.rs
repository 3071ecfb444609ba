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

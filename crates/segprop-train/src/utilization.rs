//! Achieved TFLOP/s and model FLOPs utilization (MFU) of training steps.
//!
//! The FLOPs are the ones the model launched ([`segprop_model::flops`] counts every matmul,
//! forward and backward, on the thread that runs the step: a gang rank counts its own work).
//! MFU divides the achieved rate by the device's matmul rate in the compute dtype, measured once
//! per process and device ([`peak_flops`]): on a CPU that is the rate its backend's matmul
//! reaches on this machine, so MFU says how much of what the machine can do the step used.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::DType;

use segprop_model::precision::to_dtype;

/// The side of the square matmuls [`peak_flops`] times: large enough to run at a CPU's rate,
/// small enough to take milliseconds.
const SIDE: usize = 512;

/// FLOP/s of a square matmul in `dtype` on `device`: the best of five, measured on first use
/// and remembered for the process. Inputs are constant (no random draws, so the backend's
/// seeded generator, which model initialisation uses, is left as it was).
pub fn peak_flops<B: Backend>(device: &B::Device, dtype: DType) -> f64 {
    static RATES: OnceLock<Mutex<HashMap<String, f64>>> = OnceLock::new();
    let key = format!("{}/{device:?}/{dtype:?}", std::any::type_name::<B>());
    let rates = RATES.get_or_init(Default::default);
    if let Some(rate) = rates.lock().ok().and_then(|r| r.get(&key).copied()) {
        return rate;
    }
    let a = to_dtype(Tensor::<B, 2>::ones([SIDE, SIDE], device), dtype);
    let b = to_dtype(
        Tensor::<B, 2>::ones([SIDE, SIDE], device).mul_scalar(0.5),
        dtype,
    );
    let _ = a.clone().matmul(b.clone()).into_data();
    let best = (0..5)
        .map(|_| {
            let start = Instant::now();
            let _ = a.clone().matmul(b.clone()).into_data();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    let rate = 2.0 * (SIDE as f64).powi(3) / best.max(1e-9);
    if let Ok(mut r) = rates.lock() {
        r.insert(key, rate);
    }
    rate
}

/// Matmul FLOPs launched by this thread between [`Meter::start`] and [`Meter::stop`], and the
/// seconds between them; summed over a stage's steps.
#[derive(Debug, Clone, Copy, Default)]
pub struct Meter {
    flops: f64,
    secs: f64,
    started: Option<(Instant, segprop_model::flops::Counts)>,
}

/// One step's (or a stage's) rate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rate {
    /// Achieved TFLOP/s.
    pub tflops: f64,
    /// Achieved over the device's matmul rate (0 to 1, or a little more when the step's matmuls
    /// beat the measured square one).
    pub mfu: f64,
}

impl Meter {
    pub fn start(&mut self) {
        self.started = Some((Instant::now(), segprop_model::flops::snapshot()));
    }

    /// Ends the window [`Self::start`] opened: that step's rate against `peak` FLOP/s.
    pub fn stop(&mut self, peak: f64) -> Rate {
        let Some((at, before)) = self.started.take() else {
            return Rate::default();
        };
        let secs = at.elapsed().as_secs_f64().max(1e-9);
        let launched = segprop_model::flops::snapshot().since(before);
        let flops = (launched.forward + launched.backward) as f64;
        self.flops += flops;
        self.secs += secs;
        rate(flops, secs, peak)
    }

    /// Every window's FLOPs over every window's seconds.
    pub fn total(&self, peak: f64) -> Rate {
        rate(self.flops, self.secs.max(1e-9), peak)
    }
}

fn rate(flops: f64, secs: f64, peak: f64) -> Rate {
    let per_s = flops / secs;
    Rate {
        tflops: per_s / 1e12,
        mfu: if peak > 0.0 { per_s / peak } else { 0.0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn the_peak_is_measured_once_and_positive() {
        let device = Default::default();
        let first = peak_flops::<NdArray>(&device, DType::F32);
        assert!(first > 1e6, "{first}");
        assert_eq!(peak_flops::<NdArray>(&device, DType::F32), first);
    }

    #[test]
    fn a_meter_counts_the_matmuls_launched_in_its_window() {
        let device = Default::default();
        let layer = burn::nn::LinearConfig::new(64, 32).init::<NdArray>(&device);
        let x = Tensor::<NdArray, 2>::ones([8, 64], &device);
        let mut meter = Meter::default();
        meter.start();
        let _ = segprop_model::flops::linear(&layer, x.clone());
        let step = meter.stop(1e9);
        let _ = segprop_model::flops::linear(&layer, x); // outside any window
        let total = meter.total(1e9);
        assert_eq!(meter.flops, (2 * 8 * 64 * 32) as f64);
        assert!(step.tflops > 0.0 && step.mfu > 0.0);
        assert_eq!(step, total);
    }
}

//! The worker's Prometheus metrics (`--metrics-listen`): tasks run, the running stage's progress,
//! SnapCheck hits and snapshot bytes, the memory of the devices offered, the peak heap of the
//! last stage, and the per-rank accounting of the last sharded stage. Updated from the
//! heartbeat loop (progress events) and from each report (the stage's result).

use std::sync::Mutex;

use segprop_proto::v1 as pb;
use segprop_telemetry::metrics::{Exposition, Kind};

#[derive(Debug, Default)]
struct State {
    succeeded: u64,
    failed: u64,
    /// The running task's job id and its latest training progress.
    current: Option<(String, pb::Progress)>,
    snapshot_hits: u64,
    snapshot_misses: u64,
    snapshot_fetched: u64,
    snapshot_bytes_read: u64,
    snapshot_bytes_written: u64,
    last_peak_bytes: Option<u64>,
    /// The last finished sharded stage's accounting of rank 0 (`RankMemory` in its result).
    last_rank: Option<serde_json::Value>,
}

/// The per-rank accounting of a sharded stage that `/metrics` shows: (label, `RankMemory`
/// field).
const RANK_MEMORY: [(&str, &str); 8] = [
    ("params", "params_bytes"),
    ("optimizer", "optimizer_bytes"),
    ("grads", "grad_bytes"),
    ("gathered_peak", "gathered_peak_bytes"),
    ("activations", "activation_bytes"),
    ("prefix", "prefix_bytes"),
    ("parked", "parked_bytes"),
    ("units_whole", "unit_bytes"),
];

/// Reads the bytes in use per device at scrape time: `(device name, bytes)`.
pub type MemoryProbe = Box<dyn Fn() -> Vec<(String, u64)> + Send + Sync>;

/// Shared by the daemon loop and the metrics server.
pub struct WorkerMetrics {
    name: String,
    backend: String,
    /// The devices offered: name and memory.
    devices: Vec<(String, u64)>,
    /// GPUs: memory in use now (CPU ranks have none: their heap is the stage's peak below).
    in_use: Option<MemoryProbe>,
    state: Mutex<State>,
}

impl WorkerMetrics {
    pub fn new(name: &str, backend: &str, devices: &[pb::Device]) -> Self {
        Self {
            name: name.to_string(),
            backend: backend.to_string(),
            devices: devices
                .iter()
                .map(|d| (d.name.clone(), d.memory_bytes))
                .collect(),
            in_use: None,
            state: Mutex::new(State::default()),
        }
    }

    /// Reports the devices' memory in use, read by `probe` at every scrape.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn with_memory_probe(mut self, probe: MemoryProbe) -> Self {
        self.in_use = Some(probe);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Progress events a heartbeat carries for `job_id` (eval events keep the last train loss).
    pub fn progress(&self, job_id: &str, events: &[pb::Progress]) {
        let mut s = self.lock();
        for event in events.iter().filter(|e| !e.loss.is_nan()) {
            s.current = Some((job_id.to_string(), event.clone()));
        }
    }

    /// A task ended with `result`: counts it, and adds the stage's SnapCheck and memory figures
    /// from its result JSON (a `StageRecord` with the worker's additions).
    pub fn finished(&self, result: &Result<pb::TaskSucceeded, pb::TaskFailed>) {
        let mut s = self.lock();
        s.current = None;
        let ok = match result {
            Ok(ok) => ok,
            Err(_) => {
                s.failed += 1;
                return;
            }
        };
        s.succeeded += 1;
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&ok.result_json) else {
            return;
        };
        let num = |path: &[&str]| {
            path.iter()
                .try_fold(&value, |v, key| v.get(key))
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        s.snapshot_hits += num(&["snapshots", "hits"]);
        s.snapshot_misses += num(&["snapshots", "misses"]);
        s.snapshot_fetched += num(&["snapshots", "fetched"]);
        s.snapshot_bytes_read += num(&["snapshot_io", "bytes_read"]);
        s.snapshot_bytes_written += num(&["snapshot_io", "bytes_written"]);
        if let Some(peak) = value.get("peak_bytes").and_then(serde_json::Value::as_u64) {
            s.last_peak_bytes = Some(peak);
        }
        if let Some(rank) = value.get("sharding").filter(|v| v.is_object()) {
            s.last_rank = Some(rank.clone());
        }
    }

    /// The exposition.
    pub fn render(&self) -> String {
        let s = self.lock();
        let worker = [("worker", self.name.as_str())];
        let mut e = Exposition::new();
        e.family(
            "segprop_worker_info",
            Kind::Gauge,
            "This worker: backend and devices offered to gangs (value: devices).",
        )
        .sample(
            &[("worker", &self.name), ("backend", &self.backend)],
            self.devices.len() as f64,
        );
        let memory = e.family(
            "segprop_worker_device_memory_bytes",
            Kind::Gauge,
            "Memory of each device offered to gangs (GPUs: the driver's total; CPU ranks: their share of the host's memory), what the coordinator's pre-flight check plans against.",
        );
        for (device, bytes) in &self.devices {
            memory.sample(&[("worker", &self.name), ("device", device)], *bytes as f64);
        }
        if let Some(probe) = &self.in_use {
            let used = e.family(
                "segprop_worker_device_memory_used_bytes",
                Kind::Gauge,
                "Memory in use on each GPU now (the driver's total minus free, every process).",
            );
            for (device, bytes) in probe() {
                used.sample(&[("worker", &self.name), ("device", &device)], bytes as f64);
            }
        }
        e.family(
            "segprop_worker_tasks_total",
            Kind::Counter,
            "Tasks this worker finished, by outcome.",
        )
        .sample(
            &[("worker", &self.name), ("outcome", "succeeded")],
            s.succeeded as f64,
        )
        .sample(
            &[("worker", &self.name), ("outcome", "failed")],
            s.failed as f64,
        );
        e.family(
            "segprop_worker_busy",
            Kind::Gauge,
            "1 while a training task reports progress.",
        )
        .sample(&worker, f64::from(u8::from(s.current.is_some())));
        if let Some((job, p)) = &s.current {
            let labels = [
                ("worker", self.name.as_str()),
                ("job", job.as_str()),
                ("stage", p.stage.as_str()),
            ];
            e.family(
                "segprop_worker_stage_step",
                Kind::Gauge,
                "Optimizer steps done in the running stage.",
            )
            .sample(&labels, p.step as f64);
            e.family(
                "segprop_worker_stage_loss",
                Kind::Gauge,
                "Train loss of the running stage's latest step.",
            )
            .sample(&labels, p.loss);
            e.family(
                "segprop_worker_stage_tokens_per_second",
                Kind::Gauge,
                "Training throughput of the running stage.",
            )
            .sample(&labels, p.tokens_per_s);
        }
        for (name, help, value) in [
            (
                "segprop_worker_snapshot_hits_total",
                "SnapCheck snapshot lookups served from the cache or the store.",
                s.snapshot_hits,
            ),
            (
                "segprop_worker_snapshot_misses_total",
                "SnapCheck snapshot lookups that recomputed the prefix.",
                s.snapshot_misses,
            ),
            (
                "segprop_worker_snapshot_fetched_total",
                "Snapshot entries loaded from the shared store.",
                s.snapshot_fetched,
            ),
            (
                "segprop_worker_snapshot_read_bytes_total",
                "Snapshot bytes read from the shared store.",
                s.snapshot_bytes_read,
            ),
            (
                "segprop_worker_snapshot_written_bytes_total",
                "Snapshot bytes written to the shared store.",
                s.snapshot_bytes_written,
            ),
        ] {
            e.family(name, Kind::Counter, help)
                .sample(&worker, value as f64);
        }
        if let Some(peak) = s.last_peak_bytes {
            e.family(
                "segprop_worker_stage_peak_memory_bytes",
                Kind::Gauge,
                "Peak host heap of the last finished stage (counting allocator).",
            )
            .sample(&worker, peak as f64);
        }
        if let Some(rank) = &s.last_rank {
            let num = |key: &str| rank.get(key).and_then(serde_json::Value::as_u64);
            let world = num("world").unwrap_or(1).to_string();
            let memory = e.family(
                "segprop_worker_rank_memory_bytes",
                Kind::Gauge,
                "What rank 0 of the last finished sharded stage held, by kind: its shards of the fp32 master weights (params), of both AdamW moments (optimizer), of the frozen prefix (prefix) and of the parked blocks (parked); gradient shards plus full-gradient buffers at once (grads); the most gathered weights at once (gathered_peak); saved unit-boundary activations (activations); and the trained units whole (units_whole).",
            );
            for (kind, key) in RANK_MEMORY {
                if let Some(bytes) = num(key) {
                    memory.sample(
                        &[("worker", &self.name), ("world", &world), ("kind", kind)],
                        bytes as f64,
                    );
                }
            }
            let wire = e.family(
                "segprop_worker_rank_wire_bytes_per_step",
                Kind::Gauge,
                "Wire bytes rank 0 of the last finished sharded stage moved in its last step (ring model), and what the FSDP schedule says it should move (which: measured, schedule).",
            );
            for (which, key) in [
                ("measured", "comm_bytes_per_step"),
                ("schedule", "expected_comm_bytes_per_step"),
            ] {
                if let Some(bytes) = num(key) {
                    wire.sample(
                        &[("worker", &self.name), ("world", &world), ("which", which)],
                        bytes as f64,
                    );
                }
            }
        }
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, memory_bytes: u64) -> pb::Device {
        pb::Device {
            name: name.into(),
            memory_bytes,
        }
    }

    #[test]
    fn device_memory_is_offered_and_in_use_per_device() {
        let devices = [device("cuda:0", 80 << 30), device("cuda:1", 40 << 30)];
        let metrics = WorkerMetrics::new("w1", "cuda", &devices)
            .with_memory_probe(Box::new(|| vec![("cuda:0".into(), 5 << 30)]));
        let text = metrics.render();
        for line in [
            "segprop_worker_info{worker=\"w1\",backend=\"cuda\"} 2",
            "segprop_worker_device_memory_bytes{worker=\"w1\",device=\"cuda:0\"} 85899345920",
            "segprop_worker_device_memory_bytes{worker=\"w1\",device=\"cuda:1\"} 42949672960",
            "segprop_worker_device_memory_used_bytes{worker=\"w1\",device=\"cuda:0\"} 5368709120",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }

        let cpu = WorkerMetrics::new("w2", "cpu", &[device("cpu", 1 << 30)]).render();
        assert!(!cpu.contains("segprop_worker_device_memory_used_bytes"));
    }

    #[test]
    fn a_sharded_stage_s_rank_accounting_is_exposed_by_kind() {
        let metrics = WorkerMetrics::new("w1", "cpu", &[device("cpu", 1 << 30)]);
        assert!(
            !metrics
                .render()
                .contains("segprop_worker_rank_memory_bytes")
        );
        // The result of a sharded stage: a StageRecord whose `sharding` is a RankMemory.
        let memory = segprop_train::sharded::RankMemory {
            rank: 0,
            world: 2,
            units: 4,
            unit_bytes: 4000,
            params_bytes: 2000,
            optimizer_bytes: 4000,
            grad_bytes: 3000,
            gathered_peak_bytes: 1500,
            activation_bytes: 700,
            prefix_bytes: 600,
            comm_bytes_per_step: 5004,
            expected_comm_bytes_per_step: 5000,
            ..Default::default()
        };
        let result_json =
            serde_json::json!({ "stage": "segment-1-2", "sharding": memory }).to_string();
        metrics.finished(&Ok(pb::TaskSucceeded {
            result_json,
            ..Default::default()
        }));
        let text = metrics.render();
        for line in [
            "segprop_worker_rank_memory_bytes{worker=\"w1\",world=\"2\",kind=\"params\"} 2000",
            "segprop_worker_rank_memory_bytes{worker=\"w1\",world=\"2\",kind=\"optimizer\"} 4000",
            "segprop_worker_rank_memory_bytes{worker=\"w1\",world=\"2\",kind=\"grads\"} 3000",
            "segprop_worker_rank_memory_bytes{worker=\"w1\",world=\"2\",kind=\"gathered_peak\"} 1500",
            "segprop_worker_rank_memory_bytes{worker=\"w1\",world=\"2\",kind=\"activations\"} 700",
            "segprop_worker_rank_memory_bytes{worker=\"w1\",world=\"2\",kind=\"prefix\"} 600",
            "segprop_worker_rank_memory_bytes{worker=\"w1\",world=\"2\",kind=\"parked\"} 0",
            "segprop_worker_rank_wire_bytes_per_step{worker=\"w1\",world=\"2\",which=\"measured\"} 5004",
            "segprop_worker_rank_wire_bytes_per_step{worker=\"w1\",world=\"2\",which=\"schedule\"} 5000",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}

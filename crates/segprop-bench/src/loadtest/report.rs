//! Dispatch latencies and the results of a run, as text or JSON.

use std::io::Write as _;

/// Dispatch latency statistics, in ms.
#[derive(Debug, Default, Clone)]
pub(super) struct Latency {
    pub(super) count: usize,
    pub(super) overtook: u64,
    pub(super) p50: f64,
    pub(super) p90: f64,
    pub(super) p99: f64,
    pub(super) max: f64,
    pub(super) mean: f64,
}

impl Latency {
    pub(super) fn from_samples(mut ms: Vec<f64>, overtook: u64) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        // Nearest rank.
        let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Self {
            count: ms.len(),
            overtook,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: ms[ms.len() - 1],
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
        }
    }
}

pub(super) struct Results {
    pub(super) workers: usize,
    pub(super) channels: usize,
    pub(super) jobs_submitted: usize,
    pub(super) jobs_requested: usize,
    pub(super) tasks_total: u64,
    pub(super) tasks_reported: u64,
    pub(super) heartbeat_ms: u64,
    pub(super) lease_ms: u64,
    pub(super) task_ms: (u64, u64),
    pub(super) submit_mode: String,
    pub(super) submit_s: f64,
    pub(super) wall_s: f64,
    pub(super) coordinator_cpu_s: f64,
    pub(super) loadgen_cpu_s: f64,
    pub(super) peak_rss_kib: u64,
    pub(super) rss_kib: u64,
    pub(super) idle_heartbeats: u64,
    pub(super) busy_heartbeats: u64,
    pub(super) latency: Latency,
    pub(super) errors: u64,
    pub(super) error_samples: Vec<String>,
    pub(super) timed_out: bool,
}

impl Results {
    pub(super) fn ok(&self) -> bool {
        self.errors == 0
            && !self.timed_out
            && self.jobs_submitted == self.jobs_requested
            && self.tasks_reported == self.tasks_total
    }

    pub(super) fn print(&self, json: bool, coordinator_log: &[String]) {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let cores = |cpu_s: f64| cpu_s / self.wall_s.max(1e-9);
        let l = &self.latency;
        if json {
            let value = serde_json::json!({
                "workers": self.workers,
                "channels": self.channels,
                "jobs": self.jobs_submitted,
                "jobs_requested": self.jobs_requested,
                "tasks_total": self.tasks_total,
                "tasks_dispatched": l.count,
                "tasks_reported": self.tasks_reported,
                "heartbeat_ms": self.heartbeat_ms,
                "lease_ms": self.lease_ms,
                "task_ms": [self.task_ms.0, self.task_ms.1],
                "submit": self.submit_mode,
                "submit_s": self.submit_s,
                "wall_s": self.wall_s,
                "dispatch_latency_ms": {
                    "p50": l.p50, "p90": l.p90, "p99": l.p99, "max": l.max, "mean": l.mean,
                    "overtook": l.overtook,
                },
                "coordinator_cpu_s": self.coordinator_cpu_s,
                "coordinator_cores": cores(self.coordinator_cpu_s),
                "loadgen_cores": cores(self.loadgen_cpu_s),
                "coordinator_peak_rss_mib": mib(self.peak_rss_kib),
                "coordinator_rss_mib": mib(self.rss_kib),
                "idle_heartbeats": self.idle_heartbeats,
                "busy_heartbeats": self.busy_heartbeats,
                "unexpected_errors": self.errors,
                "error_samples": self.error_samples,
                "timed_out": self.timed_out,
                "coordinator_log_lines": coordinator_log.len(),
                "ok": self.ok(),
            });
            println!("{value}");
            return;
        }
        let mut out = String::new();
        let _ = std::fmt::Write::write_fmt(
            &mut out,
            format_args!(
                "loadtest results\n\
                 workers {} ({} channels), jobs {}/{} ({}, submitted over {:.1} s), \
                 heartbeat {} ms, lease {} ms, task {}-{} ms\n\
                 tasks dispatched {}, reported {}/{}\n\
                 dispatch latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  (mean {:.2}; \
                 {} assignment(s) overtook the report reply, counted as 0)\n\
                 coordinator cpu {:.2} cores (avg over {:.1} s; {:.1} cpu-s), peak RSS {:.1} MiB \
                 (RSS at end {:.1} MiB)\n\
                 load generator cpu {:.2} cores (same machine)\n\
                 rpcs: {} idle heartbeats ({:.0}/s), {} busy heartbeats, {} reports\n\
                 unexpected errors {}{}\n",
                self.workers,
                self.channels,
                self.jobs_submitted,
                self.jobs_requested,
                self.submit_mode,
                self.submit_s,
                self.heartbeat_ms,
                self.lease_ms,
                self.task_ms.0,
                self.task_ms.1,
                l.count,
                self.tasks_reported,
                self.tasks_total,
                l.p50,
                l.p90,
                l.p99,
                l.max,
                l.mean,
                l.overtook,
                cores(self.coordinator_cpu_s),
                self.wall_s,
                self.coordinator_cpu_s,
                mib(self.peak_rss_kib),
                mib(self.rss_kib),
                cores(self.loadgen_cpu_s),
                self.idle_heartbeats,
                self.idle_heartbeats as f64 / self.wall_s.max(1e-9),
                self.busy_heartbeats,
                self.tasks_reported,
                self.errors,
                if self.timed_out {
                    " (TIMED OUT before every task was reported)"
                } else {
                    ""
                },
            ),
        );
        for sample in &self.error_samples {
            out.push_str(&format!("  error: {sample}\n"));
        }
        if !coordinator_log.is_empty() {
            out.push_str(&format!(
                "coordinator logged {} line(s) at warn or above, first:\n",
                coordinator_log.len()
            ));
            for line in coordinator_log.iter().take(5) {
                out.push_str(&format!("  {line}\n"));
            }
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
    }
}

//! Fault injection for the collective watchdog's end-to-end test: a follower rank that stops
//! participating mid-stage, as a hung or partitioned GPU rank does.
//!
//! `SEGPROP_FAULT_STALL_RANK=<rank>:<step>:<marker file>` makes follower rank `<rank>` stall
//! (sleep outside any collective) after its `<step>`-th optimizer step of a sharded stage, once:
//! the marker file is created when it fires and a later attempt that finds it runs normally. The
//! stall ends when the task is cancelled or after ten minutes, so a test process does not leak
//! a thread forever. Unset (the default), nothing happens.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub const ENV: &str = "SEGPROP_FAULT_STALL_RANK";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StallRank {
    pub rank: usize,
    pub step: u64,
    pub marker: PathBuf,
}

impl StallRank {
    pub fn from_env() -> Option<Self> {
        Self::parse(&std::env::var(ENV).ok()?)
    }

    fn parse(value: &str) -> Option<Self> {
        let mut parts = value.splitn(3, ':');
        let rank = parts.next()?.parse().ok()?;
        let step = parts.next()?.parse().ok()?;
        let marker = PathBuf::from(parts.next()?);
        Some(Self { rank, step, marker })
    }

    /// Stalls if this is the step to stall at and the fault has not fired yet.
    pub fn maybe_stall(&self, step: u64, cancel: &Arc<AtomicBool>) {
        if step != self.step || self.marker.exists() {
            return;
        }
        if std::fs::write(&self.marker, b"stalled\n").is_err() {
            return;
        }
        tracing::warn!(
            rank = self.rank,
            step,
            "fault injection: this rank stops participating"
        );
        let until = Instant::now() + Duration::from_secs(600);
        while Instant::now() < until && !cancel.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rank_step_and_marker() {
        assert_eq!(
            StallRank::parse("1:3:/tmp/x:y"),
            Some(StallRank {
                rank: 1,
                step: 3,
                marker: PathBuf::from("/tmp/x:y"),
            })
        );
        assert_eq!(StallRank::parse("1"), None);
        assert_eq!(StallRank::parse("a:3:/m"), None);
    }
}

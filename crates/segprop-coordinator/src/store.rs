//! The coordinator's durable state: every job (its spec, plan, task states, leases, accepted
//! checkpoints and committed outputs) in an embedded redb database, one JSON document per job.
//!
//! Every state transition is written before the RPC that caused it returns, so a coordinator
//! killed at any point restarts with what it had acknowledged. Lease renewals are not written
//! (they happen on every heartbeat): after a restart every running lease gets a fresh grace
//! period, in which its worker re-registers and renews it, or it expires and the task retries.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use segprop_core::sched::Job;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQ: &str = "next_job_seq";

#[derive(Debug, Clone, thiserror::Error)]
#[error("coordinator state {path}: {message}")]
pub struct StoreError {
    pub path: String,
    pub message: String,
}

pub struct StateStore {
    db: Database,
    path: String,
}

impl StateStore {
    /// Opens (or creates) `dir/coordinator.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("coordinator.redb");
        let name = path.display().to_string();
        let err = |message: String| StoreError {
            path: name.clone(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create directory: {e}")))?;
        let db = Database::create(&path).map_err(|e| err(e.to_string()))?;
        let store = Self { db, path: name };
        // Create the tables so reads of a fresh database succeed.
        let txn = store.db.begin_write().map_err(|e| store.error(e))?;
        txn.open_table(JOBS).map_err(|e| store.error(e))?;
        txn.open_table(META).map_err(|e| store.error(e))?;
        txn.commit().map_err(|e| store.error(e))?;
        Ok(store)
    }

    fn error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Every stored job, in submission order, and the next job sequence number.
    pub fn load(&self) -> Result<(Vec<Job>, u64), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(JOBS).map_err(|e| self.error(e))?;
        let mut jobs = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (key, value) = entry.map_err(|e| self.error(e))?;
            let mut job: Job = serde_json::from_slice(value.value())
                .map_err(|e| self.error(format!("job {} is unreadable: {e}", key.value())))?;
            job.upgrade_legacy_chain();
            job.upgrade_legacy_results();
            jobs.push(job);
        }
        jobs.sort_by_key(|j| j.seq);
        let meta = txn.open_table(META).map_err(|e| self.error(e))?;
        let next = meta
            .get(NEXT_SEQ)
            .map_err(|e| self.error(e))?
            .map_or(1, |v| v.value());
        Ok((jobs, next))
    }

    /// Writes encoded jobs ([`encode`]: id and JSON document) and the next sequence number in
    /// one durable transaction.
    pub fn save_encoded(&self, jobs: &[(&str, &[u8])], next_seq: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = txn.open_table(JOBS).map_err(|e| self.error(e))?;
            for (id, bytes) in jobs {
                table.insert(*id, *bytes).map_err(|e| self.error(e))?;
            }
            let mut meta = txn.open_table(META).map_err(|e| self.error(e))?;
            meta.insert(NEXT_SEQ, next_seq).map_err(|e| self.error(e))?;
        }
        txn.commit().map_err(|e| self.error(e))
    }
}

/// A job's stored document.
pub fn encode(job: &Job) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(job)
}

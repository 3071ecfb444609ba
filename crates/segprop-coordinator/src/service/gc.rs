//! Snapshot garbage collection: a job's SnapCheck snapshots are deleted from the shared store
//! once no task of it can read them again (the scheduler's snapshot budget decides which).

use super::*;

impl Coordinator {
    /// Deletes the snapshot depths no pending task can read (all of a finished job's), in the
    /// background. Returns the jobs whose `snapshots_collected` changed (to persist).
    pub(super) fn collect_snapshots(&self, inner: &mut Inner) -> Vec<JobId> {
        let mut changed = Vec::new();
        let now = now_ms();
        for job in inner.jobs.iter_mut().chain(inner.done.iter_mut()) {
            if job.snapshots_swept {
                continue;
            }
            // A lease after the job ended, no worker may still write for it: delete whatever a
            // cancelled shard put after the first collection, then never look at the job again.
            if job
                .finished_at
                .is_some_and(|at| now > at.saturating_add(self.config.lease_ms))
            {
                job.snapshots_swept = true;
                changed.push(job.id.clone());
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let (store, prefix, job_id) = (
                        self.snapshots.clone(),
                        segprop_store::layout::snapshots_dir(&convert::job_dir(job.id.as_str())),
                        job.id.clone(),
                    );
                    runtime.spawn(async move {
                        match store.delete_prefix(&prefix).await {
                            Ok((0, _)) => {}
                            Ok((objects, bytes)) => {
                                tracing::info!(job = %job_id, objects, bytes, "late snapshots swept")
                            }
                            Err(e) => {
                                tracing::warn!(job = %job_id, error = %e, "cannot sweep snapshots")
                            }
                        }
                    });
                }
                continue;
            }
            let dead = job.snapshot_gc().dead;
            if dead.is_empty() {
                continue;
            }
            job.snapshots_collected.extend(&dead);
            changed.push(job.id.clone());
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                tracing::warn!(job = %job.id, ?dead, "no runtime: snapshots left in the store");
                continue;
            };
            let (store, job_dir, job_id) = (
                self.snapshots.clone(),
                convert::job_dir(job.id.as_str()),
                job.id.clone(),
            );
            runtime.spawn(async move {
                for depth in dead {
                    let prefix = segprop_store::depth_prefix(&job_dir, depth);
                    match store.delete_prefix(&prefix).await {
                        Ok((objects, bytes)) => {
                            tracing::info!(job = %job_id, depth, objects, bytes, "snapshots collected")
                        }
                        Err(e) => {
                            tracing::warn!(job = %job_id, depth, error = %e, "cannot delete snapshots")
                        }
                    }
                }
            });
        }
        changed
    }
}

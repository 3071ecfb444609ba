//! The state lock and the writer: a slow commit delays only the call that made it.

use super::*;

const SPEC: &str = "version: 1\nname: slow\nmodel: { preset: tiny, overrides: { num_layers: 4 } }\n\
data: { corpus: builtin:synthetic, seq_len: 16, batch_size: 2, synthetic_tokens: 4000 }\n\
regime: e2e\ne2e: { exit: { max_steps: 2 } }\noptimizer: { lr: 1.0e-3 }\n";

fn open(dir: &std::path::Path) -> Arc<Coordinator> {
    Coordinator::open(CoordConfig {
        state_dir: dir.join("state"),
        artifact_root: dir.join("artifacts"),
        ..CoordConfig::default()
    })
    .expect("coordinator")
}

fn register() -> Registration {
    Registration {
        name: "w1".into(),
        backend: sched::Backend::Cpu,
        devices: 1,
        device_bytes: 8 << 30,
        host_bytes: 16 << 30,
        running: Vec::new(),
    }
}

/// Polls (yielding) until the writer has `n` writes queued.
async fn queued(c: &Coordinator, n: u64) {
    for _ in 0..10_000 {
        if c.writer.queued() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("the writer never saw write {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_commit_stalls_no_heartbeat_and_shows_no_job_before_it_is_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = open(dir.path());
    let worker = c.register(register()).await.expect("register").worker_id;
    let before = c.writer.queued();

    let hold = c.writer.hold();
    let submit = tokio::spawn({
        let c = c.clone();
        async move { c.submit(SPEC, "slow.yaml").await }
    });
    queued(&c, before + 1).await;
    // The submit's commit is held (a disk that does not answer): heartbeats still answer,
    // because the state lock is free; the job is not listed, because it is not durable.
    for _ in 0..3 {
        let heartbeat = c.heartbeat(Heartbeat {
            worker_id: worker.clone(),
            running: Vec::new(),
            free_slots: 0,
        });
        // Generous: a heartbeat stalled behind the held commit never answers.
        let reply = tokio::time::timeout(Duration::from_secs(30), heartbeat)
            .await
            .expect("a heartbeat answers while another call's commit is held")
            .expect("heartbeat");
        assert!(!reply.reregister);
    }
    assert!(c.list_locked().0.is_empty());
    assert!(!submit.is_finished());

    drop(hold);
    let job = submit.await.expect("submit task").expect("submit");
    assert_eq!(c.list().await.len(), 1);

    // What the submit acknowledged survives the coordinator.
    drop(c);
    let again = open(dir.path());
    let listed = again.list().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].job_id, job.job_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waits_for_the_commits_of_what_it_shows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = open(dir.path());
    let job = c.submit(SPEC, "slow.yaml").await.expect("submit");
    let worker = c.register(register()).await.expect("register").worker_id;
    let before = c.writer.queued();
    let hold = c.writer.hold();
    // The heartbeat leases the job's task: a transition that waits for its commit.
    let heartbeat = tokio::spawn({
        let (c, worker) = (c.clone(), worker.clone());
        async move {
            c.heartbeat(Heartbeat {
                worker_id: worker,
                running: Vec::new(),
                free_slots: 1,
            })
            .await
        }
    });
    queued(&c, before + 1).await;
    // A read now shows the lease, so it waits for the lease's commit too.
    let get = tokio::spawn({
        let (c, id) = (c.clone(), job.job_id.clone());
        async move { c.get(&id).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!heartbeat.is_finished());
    assert!(!get.is_finished());
    drop(hold);
    let reply = heartbeat.await.expect("heartbeat task").expect("heartbeat");
    assert_eq!(reply.dispatches.len(), 1);
    let shown = get.await.expect("get task").expect("get");
    assert_eq!(shown.tasks[0].worker_id, worker.as_str());
}

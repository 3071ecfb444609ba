//! Fuzzing every inbound message of the coordinator (issue 21): mutants of the encoded requests
//! a real worker and CLI send (register, heartbeat with progress and checkpoints, task reports
//! that succeed and fail, rendezvous, submit, get, cancel), decoded and checked as the gRPC
//! server does (`convert`) and handed to the coordinator's methods. Each is answered or refused with an error;
//! none may panic (a panic under the state lock would poison it for every later call), and the
//! coordinator still serves afterwards. Seeded: the same cases every run (`SEGPROP_FUZZ_CASES`
//! sets the count for a longer local run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/fuzz/mutate.rs"]
mod mutate;

use std::sync::Arc;

use prost::Message;
use segprop_coordinator::CoordConfig;
use segprop_coordinator::convert;
use segprop_coordinator::service::Coordinator;
use segprop_proto::v1 as pb;

const SPEC: &str = "version: 1\nname: fuzz\nmodel: { preset: tiny, overrides: { num_layers: 4 } }\n\
data: { corpus: builtin:synthetic, seq_len: 16, batch_size: 2, synthetic_tokens: 4000 }\n\
regime: segprop\nsegprop: { base_depth: 1, head_layers: 1, segment_size: 1, \
exit: { stage1: { max_steps: 2 }, segment: { max_steps: 2 } } }\noptimizer: { lr: 1.0e-3 }\n";

fn coordinator(dir: &std::path::Path) -> Arc<Coordinator> {
    Coordinator::open(CoordConfig {
        state_dir: dir.join("state"),
        artifact_root: dir.join("artifacts"),
        backoff_base_ms: 1,
        backoff_max_ms: 1,
        ..CoordConfig::default()
    })
    .unwrap()
}

/// One call of the service with a decoded message; what it answers does not matter here.
fn call(c: &Arc<Coordinator>, rt: &tokio::runtime::Runtime, kind: &str, bytes: &[u8]) {
    match kind {
        "register" => {
            if let Ok(m) = pb::RegisterWorkerRequest::decode(bytes)
                && let Ok(m) = convert::registration_in(m)
            {
                let _ = rt.block_on(c.register(m));
            }
        }
        "heartbeat" => {
            if let Ok(m) = pb::HeartbeatRequest::decode(bytes) {
                let _ = rt.block_on(Coordinator::heartbeat(c, convert::heartbeat_in(m)));
            }
        }
        "report" => {
            if let Ok(m) = pb::ReportTaskRequest::decode(bytes)
                && let Ok(m) = convert::report_in(m)
            {
                let _ = rt.block_on(c.report(m));
            }
        }
        "rendezvous" => {
            if let Ok(mut m) = pb::RendezvousRequest::decode(bytes) {
                // A rank > 0 waits for rank 0 up to `wait_ms`: keep the fuzz run short.
                m.wait_ms = m.wait_ms.min(2);
                if let Ok(m) = convert::rendezvous_in(m) {
                    let _ = rt.block_on(Coordinator::rendezvous(c, m));
                }
            }
        }
        "submit" => {
            if let Ok(m) = pb::SubmitJobRequest::decode(bytes) {
                let _ = rt.block_on(c.submit(&m.spec_yaml, &m.source_name));
            }
        }
        "get" => {
            if let Ok(m) = pb::GetJobRequest::decode(bytes) {
                let _ = rt.block_on(c.get(&m.job_id));
            }
        }
        "cancel" => {
            if let Ok(m) = pb::CancelJobRequest::decode(bytes) {
                let _ = rt.block_on(c.cancel(&m.job_id));
            }
        }
        other => unreachable!("{other}"),
    }
}

#[test]
fn no_inbound_message_makes_the_coordinator_panic() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let c = coordinator(tmp.path());
    // A real conversation: a job, a worker, its first assignment.
    let job = rt.block_on(c.submit(SPEC, "fuzz.yaml")).unwrap();
    let register = pb::RegisterWorkerRequest {
        protocol_version: segprop_proto::PROTOCOL_VERSION,
        name: "w1".into(),
        backend: "cpu".into(),
        devices: vec![pb::Device {
            name: "cpu".into(),
            memory_bytes: 8 << 30,
        }],
        host_memory_bytes: 16 << 30,
        running: Vec::new(),
    };
    let worker = rt
        .block_on(c.register(convert::registration_in(register.clone()).unwrap()))
        .unwrap()
        .worker_id
        .to_string();
    let heartbeat = pb::HeartbeatRequest {
        worker_id: worker.clone(),
        running: Vec::new(),
        free_slots: 1,
    };
    let reply = rt
        .block_on(Coordinator::heartbeat(
            &c,
            convert::heartbeat_in(heartbeat.clone()),
        ))
        .unwrap();
    let a = convert::heartbeat_out(reply)
        .assignments
        .first()
        .expect("the first stage is assigned")
        .clone();
    let running = pb::RunningTask {
        job_id: a.job_id.clone(),
        task_index: a.task_index,
        epoch: a.epoch,
        events: vec![pb::Progress::default()],
        checkpoint: Some(pb::CheckpointRef {
            step: 3,
            ..Default::default()
        }),
    };
    let busy = pb::HeartbeatRequest {
        worker_id: worker.clone(),
        running: vec![running],
        free_slots: 0,
    };
    let artifact = |uri: &str| pb::ArtifactRef {
        uri: uri.into(),
        checksum: "fnv1a64:0123456789abcdef".into(),
        bytes: 1234,
    };
    let report = |outcome| pb::ReportTaskRequest {
        worker_id: worker.clone(),
        job_id: a.job_id.clone(),
        task_index: a.task_index,
        epoch: a.epoch,
        outcome: Some(outcome),
    };
    let succeeded = report(pb::report_task_request::Outcome::Succeeded(
        pb::TaskSucceeded {
            artifacts: vec![artifact("jobs/x/stages/0/state")],
            result_json: r#"{"stage":"stage1","steps":2,"snapshot_depth_bytes":{"1":4096}}"#.into(),
            result: Some(pb::TaskResult {
                steps: 2,
                eval_loss: Some(1.5),
                snapshot_depth_bytes: Some(4096),
                ..Default::default()
            }),
            early_exit: false,
            metrics: Some(artifact("jobs/x/stages/0/metrics.jsonl")),
        },
    ));
    let failed = report(pb::report_task_request::Outcome::Failed(pb::TaskFailed {
        reason: "out of memory".into(),
        retryable: true,
    }));
    let rendezvous = pb::RendezvousRequest {
        worker_id: worker.clone(),
        job_id: a.job_id.clone(),
        task_index: a.task_index,
        epoch: a.epoch,
        rank: 0,
        world: 2,
        unique_id: vec![7; 128],
        wait_ms: 1,
    };
    let seeds: Vec<(String, Vec<u8>)> = vec![
        ("register".into(), register.encode_to_vec()),
        ("heartbeat".into(), heartbeat.encode_to_vec()),
        ("heartbeat".into(), busy.encode_to_vec()),
        ("report".into(), succeeded.encode_to_vec()),
        ("report".into(), failed.encode_to_vec()),
        ("rendezvous".into(), rendezvous.encode_to_vec()),
        (
            "submit".into(),
            pb::SubmitJobRequest {
                spec_yaml: SPEC.into(),
                source_name: "fuzz.yaml".into(),
            }
            .encode_to_vec(),
        ),
        (
            "get".into(),
            pb::GetJobRequest {
                job_id: job.job_id.clone(),
            }
            .encode_to_vec(),
        ),
        (
            "cancel".into(),
            pb::CancelJobRequest {
                job_id: job.job_id.clone(),
            }
            .encode_to_vec(),
        ),
    ];
    let kinds = [
        "register",
        "heartbeat",
        "report",
        "rendezvous",
        "submit",
        "get",
        "cancel",
    ];
    for (i, kind) in kinds.iter().enumerate() {
        let own: Vec<(String, Vec<u8>)> =
            seeds.iter().filter(|(k, _)| k == kind).cloned().collect();
        mutate::fuzz(&own, mutate::cases(1500), 50 + i as u64, |bytes| {
            call(&c, &rt, kind, bytes)
        });
    }
    // Still serving, its state lock not poisoned.
    assert!(!rt.block_on(c.list()).is_empty());
    rt.block_on(c.tick()).unwrap();
    let again = rt
        .block_on(c.register(convert::registration_in(register).unwrap()))
        .unwrap();
    assert!(!again.worker_id.as_str().is_empty());
}

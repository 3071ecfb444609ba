//! Runs a sweep's jobs through the coordinator: at most `parallel` in flight, each submitted
//! as `segprop-coord submit` would, polled to its end, and its summary and metrics fetched from
//! the artifact store (checked against their manifests) into `<out>/jobs/<name>/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use segprop_proto::v1 as pb;

use super::SweepJob;
use crate::client::{self, Connect};

/// How one job of the sweep ended.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobOutcome {
    pub job_id: Option<String>,
    /// `succeeded`, `failed`, `cancelled`, or `not submitted`.
    pub state: String,
    pub error: Option<String>,
    /// Submission to end, as the coordinator recorded them.
    pub job_wall_s: Option<f64>,
    /// Where the fetched `summary.json` and `metrics.jsonl` are.
    pub dir: Option<PathBuf>,
}

impl JobOutcome {
    fn failed(state: &str, error: String) -> Self {
        Self {
            job_id: None,
            state: state.into(),
            error: Some(error),
            job_wall_s: None,
            dir: None,
        }
    }
}

/// Files fetched for the report.
const FILES: [&str; 2] = ["summary.json", "metrics.jsonl"];

async fn submit(client: &mut client::JobClient, job: &SweepJob) -> Result<pb::Job, String> {
    let yaml = serde_yaml::to_string(&job.spec).map_err(|e| e.to_string())?;
    let reply = client
        .submit_job(pb::SubmitJobRequest {
            spec_yaml: yaml,
            source_name: format!("sweep job {}", job.spec.name),
        })
        .await
        .map_err(|s| format!("coordinator refused the job: {}", s.message()))?
        .into_inner();
    reply
        .job
        .ok_or_else(|| "coordinator returned no job".into())
}

async fn fetch(c: &Connect, job_id: &str, dir: &Path) -> Result<(), String> {
    let channel = client::channel(&c.url, c.tls_ca.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    let store = segprop_store::Store::grpc_namespace(
        channel,
        Some(c.token.clone()),
        segprop_store::Namespace::Artifacts,
    )
    .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let key = crate::convert::job_dir(job_id);
    for name in FILES {
        store
            .get_artifact(&format!("{key}/{name}"), &dir.join(name))
            .await
            .map_err(|e| format!("cannot fetch {name}: {e}"))?;
    }
    Ok(())
}

/// The outcomes a finished sweep left in `<out>/jobs/` (for `--report-only`): a job with a
/// `summary.json` succeeded; its `outcome.json`, when present, gives the rest.
pub fn collected(jobs: &[SweepJob], out: &Path) -> Vec<JobOutcome> {
    jobs.iter()
        .map(|job| {
            let dir = out.join("jobs").join(&job.spec.name);
            let recorded: Option<JobOutcome> = std::fs::read_to_string(dir.join("outcome.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            match (recorded, dir.join("summary.json").is_file()) {
                (Some(o), _) => o,
                (None, true) => JobOutcome {
                    job_id: None,
                    state: "succeeded".into(),
                    error: None,
                    job_wall_s: None,
                    dir: Some(dir),
                },
                (None, false) => {
                    JobOutcome::failed("no results", format!("nothing in {}", dir.display()))
                }
            }
        })
        .collect()
}

/// Submits `jobs` (at most `parallel` at a time), waits for each, fetches its results into
/// `<out>/jobs/<name>/` and returns every job's outcome, in `jobs`' order. `progress` gets one
/// line per finished job.
pub async fn run_jobs(
    c: &Connect,
    jobs: &[SweepJob],
    parallel: usize,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Vec<JobOutcome>> {
    let mut client = client::job_client(c).await?;
    let mut outcomes: Vec<Option<JobOutcome>> = vec![None; jobs.len()];
    // (index in jobs, job id, when submitted)
    let mut in_flight: Vec<(usize, String, Instant)> = Vec::new();
    let mut next = 0;
    let started = Instant::now();
    let mut done = 0;
    while done < jobs.len() {
        while in_flight.len() < parallel.max(1) && next < jobs.len() {
            let submitted = match &jobs[next].refused {
                Some(why) => Err(why.clone()),
                None => submit(&mut client, &jobs[next]).await,
            };
            match submitted {
                Ok(job) => in_flight.push((next, job.job_id, Instant::now())),
                Err(e) => {
                    progress(&format!(
                        "[{}/{}] {}: not submitted: {e}",
                        done + 1,
                        jobs.len(),
                        jobs[next].spec.name
                    ));
                    outcomes[next] = Some(JobOutcome::failed("not submitted", e));
                    done += 1;
                }
            }
            next += 1;
        }
        if in_flight.is_empty() {
            continue;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut still = Vec::new();
        for (index, job_id, submitted) in in_flight.drain(..) {
            let job = match client
                .get_job(pb::GetJobRequest {
                    job_id: job_id.clone(),
                })
                .await
            {
                Ok(reply) => reply.into_inner(),
                Err(status) => {
                    anyhow::bail!("coordinator: {}", status.message());
                }
            };
            if !client::is_terminal(&job) {
                still.push((index, job_id, submitted));
                continue;
            }
            let name = &jobs[index].spec.name;
            let wall = match job.finished_unix_ms.checked_sub(job.created_unix_ms) {
                Some(ms) if job.finished_unix_ms > 0 => ms as f64 / 1e3,
                _ => submitted.elapsed().as_secs_f64(),
            };
            let state = client::job_state_name(job.state).to_string();
            let mut outcome = JobOutcome {
                job_id: Some(job_id.clone()),
                state: state.clone(),
                error: (!job.error.is_empty()).then(|| job.error.clone()),
                job_wall_s: Some(wall),
                dir: None,
            };
            let dir = out.join("jobs").join(name);
            if job.state == pb::JobState::Succeeded as i32 {
                match fetch(c, &job_id, &dir).await {
                    Ok(()) => outcome.dir = Some(dir.clone()),
                    Err(e) => {
                        outcome.state = "succeeded, results lost".into();
                        outcome.error = Some(e);
                    }
                }
            }
            // Kept beside the results so that `--report-only` can redraw the report.
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(
                dir.join("outcome.json"),
                serde_json::to_string_pretty(&outcome).unwrap_or_default(),
            );
            done += 1;
            progress(&format!(
                "[{done}/{}] {name}: {} in {wall:.0} s{} (sweep {:.0} s)",
                jobs.len(),
                outcome.state,
                outcome
                    .error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default(),
                started.elapsed().as_secs_f64()
            ));
            outcomes[index] = Some(outcome);
        }
        in_flight = still;
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| JobOutcome::failed("not submitted", "not run".into())))
        .collect())
}

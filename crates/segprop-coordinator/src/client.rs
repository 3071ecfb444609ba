//! Client side of JobService, as the CLI uses it: connect with the bearer token, submit, and
//! watch a job with live per-stage progress bars.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use segprop_proto::v1 as pb;
use segprop_proto::v1::job_service_client::JobServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::auth::AttachToken;

pub type JobClient = JobServiceClient<InterceptedService<Channel, AttachToken>>;

/// Where and how to reach the coordinator.
#[derive(Debug, Clone)]
pub struct Connect {
    pub url: String,
    pub token: String,
    /// PEM CA certificate for an `https://` coordinator with a private CA.
    pub tls_ca: Option<std::path::PathBuf>,
}

/// Opens a channel to the coordinator (with TLS for `https://` URLs).
pub async fn channel(url: &str, tls_ca: Option<&Path>) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| anyhow::anyhow!("coordinator URL `{url}`: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = tls_ca {
            let pem =
                std::fs::read(ca).map_err(|e| anyhow::anyhow!("tls CA {}: {e}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the coordinator at {url}: {e}"))
}

pub async fn job_client(c: &Connect) -> anyhow::Result<JobClient> {
    let channel = channel(&c.url, c.tls_ca.as_deref()).await?;
    let auth = AttachToken::new(&c.token).map_err(anyhow::Error::msg)?;
    Ok(JobServiceClient::with_interceptor(channel, auth).max_decoding_message_size(64 << 20))
}

pub fn job_state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Pending) => "pending",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Succeeded) => "succeeded",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

pub fn task_state_name(state: i32) -> &'static str {
    match pb::TaskState::try_from(state) {
        Ok(pb::TaskState::Waiting) => "waiting",
        Ok(pb::TaskState::Ready) => "ready",
        Ok(pb::TaskState::Running) => "running",
        Ok(pb::TaskState::Succeeded) => "succeeded",
        Ok(pb::TaskState::Failed) => "failed",
        Ok(pb::TaskState::Cancelled) => "cancelled",
        Ok(pb::TaskState::Skipped) => "skipped",
        _ => "unknown",
    }
}

pub fn is_terminal(job: &pb::Job) -> bool {
    matches!(
        pb::JobState::try_from(job.state),
        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
    )
}

/// A table of the job's tasks (for `status`).
pub fn describe(job: &pb::Job) -> String {
    let mut out = format!(
        "job {} ({}, {}): {}\n",
        job.job_id,
        job.name,
        job.regime,
        job_state_name(job.state)
    );
    if !job.error.is_empty() {
        out.push_str(&format!("  error: {}\n", job.error));
    }
    out.push_str(&format!("  run dir: {}\n", job.run_dir));
    out.push_str("  task  name                 state      attempts  progress / result\n");
    for t in &job.tasks {
        let detail = if let Some(p) = &t.progress {
            format!("step {}/{} loss {:.4}", p.step, p.budget_steps, p.loss)
        } else if let Some(r) = &t.result {
            if let Some(eval) = r.final_eval_loss {
                format!(
                    "{}-layer model, held-out loss {eval:.4}",
                    r.final_num_layers
                )
            } else if let Some(depth) = r.snapshot_depth {
                format!("S[{depth}] of {} batches stored", r.snapshot_batches)
            } else {
                format!(
                    "{} steps, held-out loss {:.4}",
                    r.steps,
                    r.eval_loss.unwrap_or(f64::NAN)
                )
            }
        } else {
            t.error.clone()
        };
        out.push_str(&format!(
            "  {:>4}  {:<20} {:<10} {:>8}  {}\n",
            t.index,
            t.name,
            task_state_name(t.state),
            t.attempts,
            detail
        ));
    }
    out
}

/// Streams the job's events and draws one progress bar per task until the job ends; returns the
/// final job. `quiet` prints state changes only.
pub async fn watch(client: &mut JobClient, job_id: &str, quiet: bool) -> anyhow::Result<pb::Job> {
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_string(),
        })
        .await?
        .into_inner();
    let multi = MultiProgress::with_draw_target(if quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let style = ProgressStyle::with_template("{prefix:>20} [{bar:30}] {pos:>5}/{len:5} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut bars: HashMap<u32, ProgressBar> = HashMap::new();
    let mut states: HashMap<u32, i32> = HashMap::new();
    let mut last: Option<pb::Job> = None;
    let mut last_eval: HashMap<u32, f64> = HashMap::new();
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(pb::job_event::Event::Job(job)) => {
                for t in &job.tasks {
                    let prev = states.insert(t.index, t.state);
                    if prev != Some(t.state) && prev.is_some()
                        || (prev.is_none() && t.state != pb::TaskState::Waiting as i32)
                    {
                        let mut line = format!("{:>20}: {}", t.name, task_state_name(t.state));
                        if t.attempts > 1 && t.state == pb::TaskState::Running as i32 {
                            line.push_str(&format!(
                                " (attempt {}, from checkpoint step {})",
                                t.attempts, t.checkpoint_step
                            ));
                        }
                        if !t.error.is_empty() && t.state != pb::TaskState::Succeeded as i32 {
                            line.push_str(&format!(" ({})", t.error));
                        }
                        if let Some(bar) = bars.get(&t.index)
                            && t.state != pb::TaskState::Running as i32
                        {
                            bar.finish();
                        }
                        let _ = multi.println(line);
                    }
                }
                let done = is_terminal(&job);
                last = Some(job);
                if done {
                    break;
                }
            }
            Some(pb::job_event::Event::Progress(p)) => {
                let bar = bars.entry(p.task_index).or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new(p.budget_steps.max(1)));
                    bar.set_style(style.clone());
                    bar.set_prefix(p.stage.clone());
                    bar
                });
                if let Some(eval) = p.eval_loss {
                    last_eval.insert(p.task_index, eval);
                } else {
                    bar.set_position(p.step);
                }
                let eval = last_eval
                    .get(&p.task_index)
                    .map_or(String::new(), |e| format!(" held-out {e:.4}"));
                if p.loss.is_finite() {
                    bar.set_message(format!("loss {:.4}{eval} lr {:.2e}", p.loss, p.lr));
                }
            }
            None => {}
        }
    }
    for bar in bars.values() {
        bar.finish();
    }
    last.ok_or_else(|| anyhow::anyhow!("the coordinator closed the watch before sending the job"))
}

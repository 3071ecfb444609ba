//! `segprop-coord`: run the coordinator, submit and watch jobs, or run the whole demo.
//!
//! Exit codes: 0 success; 2 bad input (job spec, config, unknown job, refused token); 1 runtime
//! failure (coordinator unreachable, job failed or cancelled).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use segprop_coordinator::client::{self, Connect};
use segprop_coordinator::config::CoordConfig;
use segprop_coordinator::server;
use segprop_core::JobSpec;
use segprop_proto::v1 as pb;

/// The job `demo` runs (also the default of `segprop-worker train`).
const DEMO_JOB: &str = include_str!("../../../configs/jobs/demo.yaml");

#[derive(Parser)]
#[command(
    name = "segprop-coord",
    version,
    about = "segprop coordinator and job CLI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConnectArgs {
    /// Coordinator URL (`https://` for TLS).
    #[arg(
        long,
        env = "SEGPROP_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// Bearer token of the coordinator.
    #[arg(long, env = "SEGPROP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) of a TLS coordinator with a private CA.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator (config: defaults, then --config FILE, then SEGPROP_* variables).
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a job spec locally, then submit it. Prints the job id.
    Submit {
        job: PathBuf,
        /// Follow the job to its end with live per-stage progress.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Show a job's tasks, progress and results.
    Status {
        job_id: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List jobs.
    List {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Cancel a job; its running task stops within one heartbeat.
    Cancel {
        job_id: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Follow a job to its end with live per-stage progress.
    Watch {
        job_id: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Download a succeeded job's exported model (and its summary, loss plot and metrics) from
    /// the coordinator's artifact store, checking every file against its manifest.
    Fetch {
        job_id: String,
        /// Directory to write `model/`, `summary.txt`, … into (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// How large a micro-batch fits, and at what memory, FLOPs and speed: e2e FSDP, FSDP + CPU
    /// offload (with and without activation checkpointing), SegProp stage 1 and stage 2 (with and
    /// without SnapCheck). For a job spec, or for --model on the given hardware.
    Plan {
        /// Job spec: its model, sequence length, precision, SegProp depths and gang size.
        job: Option<PathBuf>,
        /// A preset (tiny, small, llama3-8b, llama2-70b, llama3-70b) or an HF config.json.
        #[arg(long, conflicts_with = "job")]
        model: Option<String>,
        /// GPUs of the gang (one host).
        #[arg(long, default_value_t = 8)]
        gpus: u32,
        /// Memory of one GPU.
        #[arg(long, default_value = "40GiB")]
        gpu_mem: String,
        /// Host RAM (what CPU offload may use).
        #[arg(long, default_value = "1TiB")]
        host_ram: String,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        /// SegProp base depth p, head depth r, segment size k (--model only).
        #[arg(long, default_value_t = 4)]
        p: usize,
        #[arg(long, default_value_t = 4)]
        r: usize,
        #[arg(long, default_value_t = 4)]
        k: usize,
        /// Compute precision (--model only): bf16, f16 (priced as bf16: 2 bytes) or f32.
        #[arg(long, default_value = "bf16")]
        precision: String,
        /// Dense bf16 peak of one GPU, TFLOP/s.
        #[arg(long, default_value_t = 312.0)]
        gpu_tflops: f64,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Run a grid of jobs (regimes x p x r x k x seeds over one base spec, sweep.yaml) through
    /// the coordinator, then write results.csv, results.md and SVG plots into --out.
    Sweep {
        sweep: PathBuf,
        /// Directory of the results (and each job's fetched summary and metrics).
        #[arg(long, default_value = "runs/sweep")]
        out: PathBuf,
        /// Jobs in flight at once (1: each job's wall time is its own).
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Start a coordinator and one local CPU worker for the sweep (state under
        /// <out>/cluster) instead of connecting to --coordinator.
        #[arg(long)]
        local: bool,
        /// Print the grid's jobs and exit.
        #[arg(long)]
        dry_run: bool,
        /// Run nothing: write the report again from the results a sweep left in --out.
        #[arg(long, conflicts_with = "local")]
        report_only: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Start a coordinator, one local CPU worker and a local store, run the demo job (or --job)
    /// to the end, and print where the model and the loss plot are.
    Demo {
        /// Working directory of the demo cluster (state, artifacts, worker log). Emptied first.
        #[arg(long, default_value = "runs/demo-cluster")]
        dir: PathBuf,
        /// Run this job spec instead of the built-in demo.
        #[arg(long)]
        job: Option<PathBuf>,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
    },
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn input(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
    fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let code = match status.code() {
            Code::InvalidArgument | Code::NotFound | Code::Unauthenticated => 2,
            _ => 1,
        };
        Self {
            code,
            message: format!("coordinator: {}", status.message()),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Self::runtime(format!("{err:#}"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs at info; client commands and the demo keep the terminal for progress.
    let (default_level, service) = match cli.command {
        Command::Serve { .. } => ("info", "segprop-coordinator"),
        Command::Demo { .. } | Command::Sweep { .. } => ("warn", "segprop-demo"),
        _ => ("warn", "segprop-cli"),
    };
    // Logs on stderr; spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let process = match segprop_telemetry::trace::Process::start(service, default_level, None) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.code);
        }
    };
    let result = process.runtime.block_on(run(cli.command));
    process.finish();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn connect(args: &ConnectArgs) -> Result<Connect, Failure> {
    let token = args.token.clone().ok_or_else(|| {
        Failure::input("no token: pass --token or set SEGPROP_TOKEN to the coordinator's token")
    })?;
    Ok(Connect {
        url: args.coordinator.clone(),
        token,
        tls_ca: args.tls_ca.clone(),
    })
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Serve { config } => serve(config.as_deref()).await,
        Command::Submit {
            job,
            watch,
            connect: args,
        } => {
            let spec = JobSpec::from_file(&job).map_err(|e| Failure::input(e.to_string()))?;
            let mut client = client::job_client(&connect(&args)?).await?;
            let created = submit(&mut client, &spec, &job.display().to_string()).await?;
            println!("{}", created.job_id);
            if !created.preflight.is_empty() {
                eprintln!("{}", created.preflight);
            }
            eprintln!(
                "submitted {} ({}, {} tasks); follow it with: segprop-coord watch {}",
                created.job_id,
                created.regime,
                created.tasks.len(),
                created.job_id
            );
            if watch {
                follow(&mut client, &created.job_id, false).await?;
            }
            Ok(())
        }
        Command::Status {
            job_id,
            connect: args,
        } => {
            let mut client = client::job_client(&connect(&args)?).await?;
            let job = client
                .get_job(pb::GetJobRequest { job_id })
                .await?
                .into_inner();
            print!("{}", client::describe(&job));
            Ok(())
        }
        Command::List { connect: args } => {
            let mut client = client::job_client(&connect(&args)?).await?;
            let jobs = client
                .list_jobs(pb::ListJobsRequest {})
                .await?
                .into_inner()
                .jobs;
            println!(
                "{:<32} {:<10} {:<8} {:>5}  name",
                "job", "state", "regime", "tasks"
            );
            for j in jobs {
                let done = j
                    .tasks
                    .iter()
                    .filter(|t| t.state == pb::TaskState::Succeeded as i32)
                    .count();
                println!(
                    "{:<32} {:<10} {:<8} {:>2}/{:<2}  {}",
                    j.job_id,
                    client::job_state_name(j.state),
                    j.regime,
                    done,
                    j.tasks.len(),
                    j.name
                );
            }
            Ok(())
        }
        Command::Cancel {
            job_id,
            connect: args,
        } => {
            let mut client = client::job_client(&connect(&args)?).await?;
            let job = client
                .cancel_job(pb::CancelJobRequest { job_id })
                .await?
                .into_inner();
            println!("{}: {}", job.job_id, client::job_state_name(job.state));
            Ok(())
        }
        Command::Watch {
            job_id,
            connect: args,
        } => {
            let mut client = client::job_client(&connect(&args)?).await?;
            follow(&mut client, &job_id, false).await.map(|_| ())
        }
        Command::Fetch {
            job_id,
            out,
            connect: args,
        } => fetch(&connect(&args)?, &job_id, &out).await,
        Command::Demo { dir, job, quiet } => demo(&dir, job.as_deref(), quiet).await,
        Command::Sweep {
            sweep,
            out,
            parallel,
            local,
            dry_run,
            report_only,
            connect: args,
        } => {
            let mode = match (dry_run, report_only, local) {
                (true, _, _) => SweepMode::DryRun,
                (_, true, _) => SweepMode::ReportOnly,
                (_, _, true) => SweepMode::Local,
                _ => SweepMode::Connect,
            };
            run_sweep(&sweep, &out, parallel, mode, &args).await
        }
        Command::Plan {
            job,
            model,
            gpus,
            gpu_mem,
            host_ram,
            seq,
            p,
            r,
            k,
            precision,
            gpu_tflops,
            json,
        } => {
            use segprop_coordinator::plan::{PlanRequest, report, table};
            use segprop_core::planner::{Cluster, parse_bytes};
            if gpus == 0 {
                return Err(Failure::input("--gpus: must be at least 1"));
            }
            let cluster = Cluster {
                gpus,
                gpu_mem_bytes: parse_bytes(&gpu_mem)
                    .map_err(|e| Failure::input(format!("--gpu-mem: {e}")))?,
                host_ram_bytes: parse_bytes(&host_ram)
                    .map_err(|e| Failure::input(format!("--host-ram: {e}")))?,
                gpu_flops: gpu_tflops * 1e12,
                ..Cluster::a100_40g_x8()
            };
            let request = match (job, model) {
                (Some(job), _) => {
                    let spec =
                        JobSpec::from_file(&job).map_err(|e| Failure::input(e.to_string()))?;
                    PlanRequest::from_spec(&spec, cluster).map_err(Failure::input)?
                }
                (None, Some(model)) => {
                    let (config, model_name) =
                        PlanRequest::model(&model).map_err(Failure::input)?;
                    let bf16 = match precision.as_str() {
                        "bf16" | "f16" => true,
                        "f32" => false,
                        other => {
                            return Err(Failure::input(format!(
                                "--precision {other}: use bf16, f16 or f32"
                            )));
                        }
                    };
                    if p + r > config.num_layers || k == 0 {
                        return Err(Failure::input(format!(
                            "--p {p} --r {r} --k {k}: need p + r <= {} layers and k >= 1",
                            config.num_layers
                        )));
                    }
                    PlanRequest {
                        config,
                        model_name,
                        cluster,
                        seq_len: seq,
                        base_depth: p,
                        head_layers: r,
                        segment_size: k,
                        bf16,
                        tokens: 1e9,
                    }
                }
                (None, None) => {
                    return Err(Failure::input(
                        "plan what? give a job spec, or --model PRESET|config.json",
                    ));
                }
            };
            let report = report(&request);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report)
                        .map_err(|e| Failure::runtime(e.to_string()))?
                );
            } else {
                print!("{}", table(&report));
            }
            Ok(())
        }
    }
}

/// Files `export` stores under the job's key; `model` is required, the others are fetched when
/// present.
const EXPORTED: [&str; 5] = [
    "model",
    "summary.txt",
    "summary.json",
    "loss.svg",
    "metrics.jsonl",
];

async fn fetch(c: &Connect, job_id: &str, out: &Path) -> Result<(), Failure> {
    let mut client = client::job_client(c).await?;
    let job = client
        .get_job(pb::GetJobRequest {
            job_id: job_id.to_string(),
        })
        .await?
        .into_inner();
    if job.state != pb::JobState::Succeeded as i32 {
        return Err(Failure::input(format!(
            "job {job_id} is {}: only a succeeded job has an exported model",
            client::job_state_name(job.state)
        )));
    }
    let channel = client::channel(&c.url, c.tls_ca.as_deref()).await?;
    let store = segprop_store::Store::grpc_namespace(
        channel,
        Some(c.token.clone()),
        segprop_store::Namespace::Artifacts,
    )
    .map_err(|e| Failure::input(e.to_string()))?;
    std::fs::create_dir_all(out)
        .map_err(|e| Failure::runtime(format!("--out {}: {e}", out.display())))?;
    let job_key = segprop_coordinator::convert::job_dir(job_id);
    for name in EXPORTED {
        let target = out.join(name);
        match store
            .get_artifact(&format!("{job_key}/{name}"), &target)
            .await
        {
            Ok(manifest) => println!(
                "{}: {} file(s), {} bytes, verified",
                target.display(),
                manifest.files.len(),
                manifest.bytes
            ),
            Err(segprop_store::Error::NotFound { .. }) if name != "model" => {}
            Err(e) => {
                return Err(Failure::runtime(format!(
                    "cannot fetch {name} of job {job_id}: {e}"
                )));
            }
        }
    }
    Ok(())
}

async fn submit(
    client: &mut client::JobClient,
    spec: &JobSpec,
    source: &str,
) -> Result<pb::Job, Failure> {
    // The resolved spec: relative paths are made absolute against the spec file's directory.
    use tracing::Instrument;

    let yaml = serde_yaml::to_string(spec)
        .map_err(|e| Failure::runtime(format!("cannot encode the spec: {e}")))?;
    // The root of the job's trace: the coordinator's SubmitJob span and every task span of the
    // job descend from it (when spans are exported).
    let span = tracing::info_span!(
        "submit",
        otel.name = "segprop-coord submit",
        otel.kind = "client",
        job.name = %spec.name,
        job.source = source,
        job.id = tracing::field::Empty,
    );
    let reply = client
        .submit_job(pb::SubmitJobRequest {
            spec_yaml: yaml,
            source_name: source.to_string(),
        })
        .instrument(span.clone())
        .await?
        .into_inner();
    let job = reply
        .job
        .ok_or_else(|| Failure::runtime("coordinator returned no job"))?;
    span.record("job.id", job.job_id.as_str());
    Ok(job)
}

/// Watches to the end; a failed or cancelled job is a runtime failure.
async fn follow(
    client: &mut client::JobClient,
    job_id: &str,
    quiet: bool,
) -> Result<pb::Job, Failure> {
    let job = client::watch(client, job_id, quiet).await?;
    eprint!("{}", client::describe(&job));
    match pb::JobState::try_from(job.state) {
        Ok(pb::JobState::Succeeded) => Ok(job),
        _ => Err(Failure::runtime(format!(
            "job {} {}{}",
            job.job_id,
            client::job_state_name(job.state),
            if job.error.is_empty() {
                String::new()
            } else {
                format!(": {}", job.error)
            }
        ))),
    }
}

async fn serve(config: Option<&Path>) -> Result<(), Failure> {
    let config = CoordConfig::load(config).map_err(|e| Failure::input(e.to_string()))?;
    if config.token.is_none() {
        return Err(Failure::input(
            "no token configured: set `token` in the config file or SEGPROP_TOKEN",
        ));
    }
    let running = server::start(config).await?;
    println!("coordinator listening on {}", running.addr);
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.stop().await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// What `sweep` does.
#[derive(PartialEq)]
enum SweepMode {
    DryRun,
    ReportOnly,
    Local,
    Connect,
}

/// Expands the sweep, runs its jobs (on a local cluster with `local`) and writes the report.
async fn run_sweep(
    file: &Path,
    out: &Path,
    parallel: usize,
    mode: SweepMode,
    args: &ConnectArgs,
) -> Result<(), Failure> {
    use segprop_coordinator::sweep::{SweepSpec, report, run};
    let (sweep, base) = SweepSpec::from_file(file).map_err(Failure::input)?;
    let jobs = sweep
        .jobs(&base)
        .map_err(|e| Failure::input(format!("{}: {e}", file.display())))?;
    if mode == SweepMode::DryRun {
        for job in &jobs {
            println!("{}", job.spec.name);
        }
        return Ok(());
    }
    let outcomes = if mode == SweepMode::ReportOnly {
        run::collected(&jobs, out)
    } else {
        eprintln!("sweep {}: {} jobs", sweep.name, jobs.len());
        let cluster = match mode {
            SweepMode::Local => Some(
                segprop_coordinator::local::LocalCluster::start(
                    &out.join("cluster"),
                    "sweep-local-cpu",
                )
                .await?,
            ),
            _ => None,
        };
        let c = match &cluster {
            Some(cluster) => cluster.connect.clone(),
            None => connect(args)?,
        };
        let outcomes =
            run::run_jobs(&c, &jobs, parallel, out, &mut |line| eprintln!("{line}")).await;
        if let Some(cluster) = cluster {
            cluster.stop().await?;
        }
        outcomes?
    };
    let rows: Vec<_> = jobs
        .iter()
        .zip(&outcomes)
        .map(|(job, outcome)| report::job_row(job, outcome))
        .collect();
    let files = report::write(out, &sweep.name, &rows)
        .map_err(|e| Failure::runtime(format!("{}: {e}", out.display())))?;
    for f in files {
        println!("{}", f.display());
    }
    let failed = rows
        .iter()
        .filter(|r| !r.final_eval_loss.is_finite())
        .count();
    if failed > 0 {
        return Err(Failure::runtime(format!(
            "{failed} of {} jobs have no results (see results.md)",
            rows.len()
        )));
    }
    Ok(())
}

/// Coordinator in this process, one `segprop-worker serve` child, the demo job, watched to the end.
async fn demo(dir: &Path, job: Option<&Path>, quiet: bool) -> Result<(), Failure> {
    let spec = match job {
        Some(path) => JobSpec::from_file(path),
        None => JobSpec::from_yaml_str(DEMO_JOB, "<built-in demo job>"),
    }
    .map_err(|e| Failure::input(e.to_string()))?;
    let cluster = segprop_coordinator::local::LocalCluster::start(dir, "demo-local-cpu").await?;
    eprintln!(
        "coordinator: {} (state in {})",
        cluster.connect.url,
        dir.join("state").display()
    );
    eprintln!(
        "worker: {} (log: {})",
        cluster.worker_bin.display(),
        cluster.worker_log.display()
    );
    let connect = cluster.connect.clone();
    let outcome = async {
        let mut client = client::job_client(&connect).await?;
        let created = submit(&mut client, &spec, "demo job").await?;
        eprintln!(
            "submitted {} ({} tasks)",
            created.job_id,
            created.tasks.len()
        );
        follow(&mut client, &created.job_id, quiet).await
    }
    .await;

    cluster.stop().await?;
    let job = outcome?;
    let run_dir = PathBuf::from(&job.run_dir);
    println!();
    println!(
        "model (Hugging Face layout): {}",
        run_dir.join("model").display()
    );
    println!(
        "loss plot:                   {}",
        run_dir.join("loss.svg").display()
    );
    println!(
        "metrics:                     {}",
        run_dir.join("metrics.jsonl").display()
    );
    if let Ok(summary) = std::fs::read_to_string(run_dir.join("summary.txt")) {
        println!();
        print!("{summary}");
    }
    Ok(())
}

//! `segprop-worker`: the worker daemon. `serve` registers with a coordinator and runs the tasks
//! it assigns; the standalone modes are `train` (run a job spec on this machine) and `validate`
//! (check a spec and print its stage plan).

mod advance;
mod artifacts;
mod convert;
mod daemon;
mod error;
mod export;
mod fault;
mod gang_task;
mod observe;
mod restore;
mod snapshots;
mod task;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use segprop_core::{JobSpec, StagePlan};
use segprop_train::alloc::CountingAllocator;
use segprop_train::metrics::{ProgressReporter, summary_table};
use segprop_train::{RunOptions, TrainError};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// The job that runs when `train` is given no spec file.
const DEMO_JOB: &str = include_str!("../../../configs/jobs/demo.yaml");

#[derive(Parser)]
#[command(
    name = "segprop-worker",
    version,
    about = "segprop worker: runs SegProp training stages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the `serve` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a job spec on this machine and write the final model and metrics.
    Train {
        /// Job spec (YAML). Without one, the built-in demo job runs.
        job: Option<PathBuf>,
        /// Run directory (model/, metrics.jsonl, summary.json, loss.svg).
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Do not draw progress bars.
        #[arg(long)]
        quiet: bool,
        /// Save a mid-stage checkpoint every N steps of a stage, under `<out>/checkpoints/`
        /// (one file per rank and a manifest for a sharded job).
        #[arg(long, default_value_t = 0)]
        checkpoint_every: u64,
        /// Continue from a checkpoint of the same job (a sharded one resumes on any number of
        /// ranks).
        #[arg(long)]
        resume: Option<PathBuf>,
    },
    /// Check a job spec and print its stage plan.
    Validate { job: PathBuf },
    /// Write multiple-choice tasks (`ending.jsonl`, `cloze.jsonl`) from the held-out text of a
    /// job's corpus, for the job's `eval.tasks`.
    Tasks {
        job: PathBuf,
        /// Directory the task files are written to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Examples per task (fewer when the held-out text has fewer usable lines).
        #[arg(long, default_value_t = 500)]
        examples: usize,
        /// Seed of the choice of lines and of the distractors.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Register with a coordinator and run the tasks it assigns, until SIGTERM.
    Serve {
        /// Coordinator URL.
        #[arg(
            long,
            env = "SEGPROP_COORDINATOR",
            default_value = "http://127.0.0.1:50051"
        )]
        coordinator: String,
        /// Bearer token of the coordinator.
        #[arg(long, env = "SEGPROP_TOKEN", hide_env_values = true)]
        token: String,
        /// Name shown by the coordinator (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Artifact store root, when mounted elsewhere than the coordinator says.
        #[arg(long)]
        artifact_root: Option<PathBuf>,
        /// Scratch directory (SnapCheck spill files).
        #[arg(long, default_value = "segprop-worker-work")]
        work_dir: PathBuf,
        /// Training backend of this worker: cpu, or cuda (builds with the `cuda` feature).
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// CA certificate (PEM) of an `https://` coordinator with a private CA.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// SnapCheck snapshot store shared by the workers: `grpc` (through the coordinator,
        /// for hosts without shared storage), `s3://bucket/prefix`, `file:///dir`, or a
        /// directory. Default: `snapshot-store/` under the artifact root.
        #[arg(long, env = "SEGPROP_SNAPSHOT_STORE")]
        snapshot_store: Option<String>,
        /// Artifact store (stage states, checkpoints, metrics, the exported model): `grpc`
        /// (through the coordinator), `s3://bucket/prefix`, `file:///dir`, or a directory.
        /// Default: the artifact root directory.
        #[arg(long, env = "SEGPROP_ARTIFACT_STORE")]
        artifact_store: Option<String>,
        /// Endpoint of an S3-compatible server (MinIO, Ceph, moto, …); credentials come from
        /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
        #[arg(long, env = "SEGPROP_S3_ENDPOINT")]
        s3_endpoint: Option<String>,
        /// Region of the S3 bucket.
        #[arg(long, env = "SEGPROP_S3_REGION")]
        s3_region: Option<String>,
        /// Allow a plain-http S3 endpoint.
        #[arg(long, env = "SEGPROP_S3_ALLOW_HTTP")]
        s3_allow_http: bool,
        /// Exit after running this many tasks (preemptible hosts, rolling restarts).
        #[arg(long)]
        max_tasks: Option<u64>,
        /// Devices this worker offers a gang: with `--backend cpu`, the number of CPU ranks (threads)
        /// a sharded job (`resources.devices_per_gang`) may run on; with cuda, the GPUs
        /// `cuda:0..N`.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        devices: u32,
        /// Memory this worker offers jobs (`64GiB`, `512MiB`, bytes), which the coordinator's
        /// pre-flight check sizes jobs against. Default: the host's, capped by the container's
        /// cgroup limit.
        #[arg(long, env = "SEGPROP_WORKER_MEMORY", value_parser = parse_memory)]
        memory: Option<u64>,
        /// Serve `grpc.health.v1.Health` on this address (Kubernetes gRPC probes); it answers
        /// while the process runs, whether or not the coordinator is reachable.
        #[arg(long, env = "SEGPROP_HEALTH_LISTEN")]
        health_listen: Option<std::net::SocketAddr>,
        /// Serve Prometheus `/metrics` and `/healthz` over HTTP on this address.
        #[arg(long, env = "SEGPROP_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
}

fn parse_memory(text: &str) -> Result<u64, String> {
    segprop_core::planner::parse_bytes(text)
}

/// A store at `url` with the S3 settings given on the command line (ignored by other stores).
fn store_config(
    url: String,
    (endpoint, region, allow_http): &(Option<String>, Option<String>, bool),
) -> segprop_store::StoreConfig {
    segprop_store::StoreConfig {
        url,
        s3_endpoint: endpoint.clone(),
        s3_region: region.clone(),
        allow_http: *allow_http,
        ..Default::default()
    }
}

fn load_spec(job: Option<&PathBuf>) -> Result<JobSpec, segprop_core::SpecError> {
    match job {
        Some(path) => JobSpec::from_file(path),
        None => JobSpec::from_yaml_str(DEMO_JOB, "<built-in demo job>"),
    }
}

fn main() -> ExitCode {
    segprop_train::alloc::keep_freed_memory();
    let cli = Cli::parse();
    // Logs on stderr; spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set. Training runs on
    // its own threads: two runtime threads serve the gRPC calls and heartbeats.
    let process = match segprop_telemetry::trace::Process::start("segprop-worker", "info", Some(2))
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.code);
        }
    };
    let code = run(cli, &process.runtime);
    process.finish();
    code
}

fn run(cli: Cli, runtime: &tokio::runtime::Runtime) -> ExitCode {
    match cli.command {
        Command::Serve {
            coordinator,
            token,
            name,
            artifact_root,
            work_dir,
            backend,
            tls_ca,
            snapshot_store,
            artifact_store,
            s3_endpoint,
            s3_region,
            s3_allow_http,
            max_tasks,
            devices,
            memory,
            health_listen,
            metrics_listen,
        } => {
            let parsed = segprop_core::spec::Backend::parse(&backend)
                .filter(|b| *b == segprop_core::spec::Backend::Cpu || cfg!(feature = "cuda"));
            let Some(backend) = parsed else {
                eprintln!(
                    "error: --backend {backend}: this worker supports cpu{}",
                    if cfg!(feature = "cuda") {
                        " and cuda"
                    } else {
                        " (rebuild with --features cuda for cuda)"
                    }
                );
                return ExitCode::from(2);
            };
            let name = name.unwrap_or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "worker".into())
            });
            let s3 = (s3_endpoint, s3_region, s3_allow_http);
            let options = daemon::DaemonOptions {
                coordinator,
                token,
                name,
                artifact_root,
                work_dir,
                backend,
                tls_ca,
                snapshot_store: snapshot_store.map(|url| store_config(url, &s3)),
                artifact_store: artifact_store.map(|url| store_config(url, &s3)),
                max_tasks,
                devices: devices as usize,
                memory_bytes: memory,
                health_listen,
                metrics_listen,
            };
            match runtime.block_on(daemon::serve(options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Tasks {
            job,
            out,
            examples,
            seed,
        } => {
            let spec = match segprop_core::JobSpec::from_file_before_tasks(&job) {
                Ok(spec) => spec,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::from(2);
                }
            };
            match segprop_train::tasks::generate::write_tasks(&spec, &out, examples, seed) {
                Ok(written) => {
                    for (path, n) in written {
                        println!("{}: {n} examples", path.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Validate { job } => {
            match load_spec(Some(&job)).and_then(|s| s.resolve_model_config().map(|c| (s, c))) {
                Ok((spec, config)) => {
                    let plan = StagePlan::new(&spec, config.num_layers);
                    println!(
                        "{}: valid ({} regime, {} parameters)",
                        job.display(),
                        spec.regime,
                        config.num_params()
                    );
                    for stage in plan.stages {
                        println!("  stage {:>3}: {}", stage.index, stage.name);
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Train {
            job,
            out,
            quiet,
            checkpoint_every,
            resume,
        } => {
            let spec = match load_spec(job.as_ref()) {
                Ok(spec) => spec,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::from(2);
                }
            };
            let mut options = RunOptions::new(&out);
            options.checkpoint_every = checkpoint_every;
            options.resume_from = resume;
            match train(spec, options, quiet) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) if err.is_bad_input() || matches!(err, TrainError::Resume { .. }) => {
                    eprintln!("error: {err}");
                    ExitCode::from(2)
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn train(spec: JobSpec, options: RunOptions, quiet: bool) -> Result<(), TrainError> {
    let out = options.out_dir.clone();
    let mut progress = ProgressReporter::default();
    let mut silent = segprop_train::metrics::RecordingObserver::default();
    let observer: &mut dyn segprop_train::TrainObserver =
        if quiet { &mut silent } else { &mut progress };
    let summary =
        match spec.resources.backend {
            // bf16/f16 run on flex, which has the 16-bit types (docs/adr/0003-cpu-backends.md).
            segprop_core::spec::BackendKind::Cpu if spec.resources.precision.is_half() => {
                segprop_train::run_job::<segprop_train::CpuHalfBackend>(
                    spec,
                    Default::default(),
                    &options,
                    observer,
                )?
            }
            segprop_core::spec::BackendKind::Cpu => segprop_train::run_job::<
                segprop_train::CpuBackend,
            >(
                spec, Default::default(), &options, observer
            )?,
            segprop_core::spec::BackendKind::Cuda => run_cuda(spec, &options, observer)?,
        };
    print!("{}", summary_table(&summary));
    println!("model:   {}", out.join("model").display());
    println!("metrics: {}", out.join("metrics.jsonl").display());
    println!("plot:    {}", out.join("loss.svg").display());
    Ok(())
}

#[cfg(feature = "cuda")]
fn run_cuda(
    spec: JobSpec,
    options: &RunOptions,
    observer: &mut dyn segprop_train::TrainObserver,
) -> Result<segprop_train::RunSummary, TrainError> {
    segprop_train::cuda::run_job_cuda(spec, options, observer)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(
    _spec: JobSpec,
    _options: &RunOptions,
    _observer: &mut dyn segprop_train::TrainObserver,
) -> Result<segprop_train::RunSummary, TrainError> {
    Err(TrainError::Spec(segprop_core::SpecError::invalid(
        "resources.backend",
        "this segprop-worker was built without the `cuda` feature; rebuild with `--features cuda` or use `backend: cpu`",
    )))
}

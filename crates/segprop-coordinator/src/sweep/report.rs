//! A sweep's results: one row per job read from its `summary.json` and `metrics.jsonl`, written
//! as `results.csv` (every job) and `results.md` (mean and spread over seeds per grid point,
//! E2E at equal steps and at equal wall time, accuracy per committed stage, failures), and SVG
//! plots: stage-concatenated learning curves, the accuracy-time-memory frontier and accuracy per
//! committed stage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use segprop_core::StagePlan;
use segprop_core::planner::{AttentionKernel, preflight::stage_workload, step_flops_per_token};
use serde_json::Value;

use super::run::JobOutcome;
use super::svg::{self, Dot, Line};
use super::{SweepJob, SweepRegime};

/// One stage of a finished job.
#[derive(Debug, Clone)]
pub struct StageRow {
    pub name: String,
    pub eval_loss: f64,
    /// (task, acc, acc_norm)
    pub tasks: Vec<(String, f64, f64)>,
}

/// One job of the sweep, as the report uses it.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub name: String,
    pub config: String,
    pub regime: SweepRegime,
    pub p: Option<usize>,
    pub r: Option<usize>,
    pub k: Option<usize>,
    pub seed: u64,
    pub state: String,
    pub error: Option<String>,
    pub final_eval_loss: f64,
    /// Of the exported model: (task, acc, acc_norm).
    pub tasks: Vec<(String, f64, f64)>,
    pub steps: u64,
    pub tokens: u64,
    /// Training time: the stages' wall time (the time axis of the curves).
    pub train_wall_s: f64,
    /// Submission to end as the coordinator saw it (snapshot tasks, export, queueing).
    pub job_wall_s: f64,
    /// The largest training peak of a stage (SnapCheck's cache not counted).
    pub peak_mib: f64,
    /// The largest SnapCheck cache of a stage, memory and disk.
    pub snapcheck_mib: f64,
    /// Matmul FLOPs of the training steps, by the planner's count (evaluation, task scoring and
    /// SnapCheck's advances excluded; with SnapCheck no prefix forward).
    pub flops: f64,
    pub stages: Vec<StageRow>,
    /// Held-out evaluations: (global step, training wall time so far, loss).
    pub curve: Vec<(f64, f64, f64)>,
    /// Global step at which each stage after the first starts.
    pub boundaries: Vec<(f64, String)>,
}

fn f(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn tasks_of(v: &Value) -> Vec<(String, f64, f64)> {
    v.get("tasks")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        t.get("task")
                            .and_then(Value::as_str)
                            .unwrap_or("?")
                            .to_string(),
                        f(t, "acc"),
                        f(t, "acc_norm"),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reads a job's files; a job without them is a row with its state and error only.
pub fn job_row(job: &SweepJob, outcome: &JobOutcome) -> JobRow {
    let mut row = JobRow {
        name: job.spec.name.clone(),
        config: job.config_label(),
        regime: job.regime,
        p: job.base_depth,
        r: job.head_layers,
        k: job.segment_size,
        seed: job.seed,
        state: outcome.state.clone(),
        error: outcome.error.clone(),
        final_eval_loss: f64::NAN,
        tasks: Vec::new(),
        steps: 0,
        tokens: 0,
        train_wall_s: f64::NAN,
        job_wall_s: outcome.job_wall_s.unwrap_or(f64::NAN),
        peak_mib: f64::NAN,
        snapcheck_mib: f64::NAN,
        flops: f64::NAN,
        stages: Vec::new(),
        curve: Vec::new(),
        boundaries: Vec::new(),
    };
    let Some(dir) = &outcome.dir else {
        return row;
    };
    if let Err(e) = fill(&mut row, job, dir) {
        row.state = "succeeded, results unreadable".into();
        row.error = Some(e);
    }
    row
}

fn fill(row: &mut JobRow, job: &SweepJob, dir: &Path) -> Result<(), String> {
    let path = dir.join("summary.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let summary: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    row.final_eval_loss = f(&summary, "final_eval_loss");
    row.tasks = tasks_of(&summary);
    row.steps = u(&summary, "total_steps");
    let stages = summary
        .get("stages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let config = job.spec.resolve_model_config().map_err(|e| e.to_string())?;
    let plan = StagePlan::new(&job.spec, config.num_layers);
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let (mut wall, mut peak, mut cache, mut flops) = (0.0, 0.0f64, 0.0f64, 0.0);
    let mut stage_start = Vec::new();
    let snapcheck = match job.spec.regime {
        segprop_core::Regime::Segprop => job.spec.segprop.snapcheck,
        segprop_core::Regime::Lw => job.spec.lw.snapcheck,
        segprop_core::Regime::E2e => false,
    };
    for s in &stages {
        stage_start.push(wall);
        wall += f(s, "wall_s");
        let tokens = u(s, "tokens");
        row.tokens += tokens;
        peak = peak.max(mib(u(s, "training_peak_bytes")));
        if let Some(c) = s.get("snapshots").filter(|c| !c.is_null()) {
            cache = cache.max(mib(u(c, "memory_bytes") + u(c, "disk_bytes")));
        }
        let index = u(s, "stage_index") as usize;
        if let Some(entry) = plan.stages.get(index) {
            let mut w = stage_workload(&job.spec, &entry.kind, config.num_layers);
            // With SnapCheck a stage reads its prefix's output instead of running it.
            if snapcheck {
                w.frozen_blocks = 0;
            }
            let (fwd, bwd, re) = step_flops_per_token(
                &config,
                &w,
                job.spec.data.seq_len,
                AttentionKernel::DenseMasked,
            );
            flops += tokens as f64 * (fwd + bwd + re);
        }
        row.stages.push(StageRow {
            name: s
                .get("stage")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
            eval_loss: f(s, "eval_loss"),
            tasks: tasks_of(s),
        });
    }
    row.train_wall_s = wall;
    row.peak_mib = peak;
    row.snapcheck_mib = cache;
    row.flops = flops;
    let metrics = dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&metrics).map_err(|e| format!("{}: {e}", metrics.display()))?;
    let mut seen_stage = None;
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if event.get("event").and_then(Value::as_str) != Some("eval") {
            continue;
        }
        let index = u(&event, "stage_index") as usize;
        let step = f(&event, "global_step");
        let at = stage_start.get(index).copied().unwrap_or(f64::NAN) + f(&event, "stage_wall_s");
        row.curve.push((step, at, f(&event, "eval_loss")));
        if seen_stage != Some(index) {
            if index > 0 {
                let name = row.stages.get(index).map_or("?", |s| s.name.as_str());
                let start = step - f(&event, "step");
                row.boundaries.push((start, name.to_string()));
            }
            seen_stage = Some(index);
        }
    }
    Ok(())
}

/// Mean and sample standard deviation of the finite values.
fn mean_sd(values: impl Iterator<Item = f64>) -> (f64, f64, usize) {
    let v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, 0);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64
    } else {
        0.0
    };
    (m, var.sqrt(), v.len())
}

fn pm((m, sd, n): (f64, f64, usize), digits: usize) -> String {
    match n {
        0 => "-".into(),
        1 => format!("{m:.digits$}"),
        _ => format!("{m:.digits$} ± {sd:.digits$}"),
    }
}

/// E2E's held-out loss after `seconds` of training, interpolated on its curve (its last value
/// when it trained for less time).
fn loss_at_time(curve: &[(f64, f64, f64)], seconds: f64) -> f64 {
    let Some(first) = curve.first() else {
        return f64::NAN;
    };
    if seconds <= first.1 {
        return first.2;
    }
    for pair in curve.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if seconds <= b.1 {
            let t = (seconds - a.1) / (b.1 - a.1).max(1e-9);
            return a.2 + t * (b.2 - a.2);
        }
    }
    curve.last().map_or(f64::NAN, |c| c.2)
}

fn ok(rows: &[JobRow]) -> impl Iterator<Item = &JobRow> {
    rows.iter().filter(|r| r.final_eval_loss.is_finite())
}

/// Grid points in first-seen order, each with its jobs.
fn configs(rows: &[JobRow]) -> Vec<(String, Vec<&JobRow>)> {
    let mut order: Vec<(String, Vec<&JobRow>)> = Vec::new();
    for row in rows {
        match order.iter_mut().find(|(c, _)| *c == row.config) {
            Some((_, v)) => v.push(row),
            None => order.push((row.config.clone(), vec![row])),
        }
    }
    order
}

fn task_names(rows: &[JobRow]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for row in rows {
        for (t, _, _) in &row.tasks {
            if !names.contains(t) {
                names.push(t.clone());
            }
        }
    }
    names
}

fn acc(tasks: &[(String, f64, f64)], name: &str) -> f64 {
    tasks.iter().find(|t| t.0 == name).map_or(f64::NAN, |t| t.1)
}

/// `results.csv`: one line per job.
pub fn csv(rows: &[JobRow]) -> String {
    let tasks = task_names(rows);
    let mut out = String::from(
        "job,regime,p,r,k,seed,state,final_eval_loss,steps,tokens,train_wall_s,job_wall_s,\
         peak_mib,snapcheck_mib,flops",
    );
    for t in &tasks {
        out.push_str(&format!(",{t}_acc,{t}_acc_norm"));
    }
    out.push_str(",error\n");
    let opt = |v: Option<usize>| v.map(|v| v.to_string()).unwrap_or_default();
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{:.5},{},{},{:.2},{:.2},{:.1},{:.1},{:.4e}",
            r.name,
            r.regime.name(),
            opt(r.p),
            opt(r.r),
            opt(r.k),
            r.seed,
            r.state,
            r.final_eval_loss,
            r.steps,
            r.tokens,
            r.train_wall_s,
            r.job_wall_s,
            r.peak_mib,
            r.snapcheck_mib,
            r.flops
        ));
        for t in &tasks {
            let (a, n) = r
                .tasks
                .iter()
                .find(|x| x.0 == *t)
                .map_or((f64::NAN, f64::NAN), |x| (x.1, x.2));
            out.push_str(&format!(",{a:.4},{n:.4}"));
        }
        let error = r
            .error
            .clone()
            .unwrap_or_default()
            .replace(['"', '\n'], " ");
        out.push_str(&format!(",\"{error}\"\n"));
    }
    out
}

/// `results.md`: per grid point over seeds, against E2E at equal steps and equal wall time.
pub fn markdown(title: &str, rows: &[JobRow]) -> String {
    let tasks = task_names(rows);
    let e2e: BTreeMap<u64, &JobRow> = ok(rows)
        .filter(|r| r.regime == SweepRegime::E2e)
        .map(|r| (r.seed, r))
        .collect();
    let mut out = format!(
        "# {title}\n\nMean ± sample standard deviation over the seeds that finished. \
         *vs E2E*: held-out loss relative to E2E's of the same seed at the end (equal \
         optimizer steps when the sweep sets `steps`). *E2E at equal time*: E2E's held-out loss \
         after the same training wall time, read off its curve. Time is the stages' training \
         time; peak is the largest training peak of a stage (SnapCheck's cache apart).\n\n\
         | config | seeds | held-out loss | vs E2E | E2E at equal time |"
    );
    for t in &tasks {
        out.push_str(&format!(" {t} acc |"));
    }
    out.push_str(" train s | peak MiB | SnapCheck MiB | TFLOPs |\n|---|---:|---:|---:|---:|");
    for _ in &tasks {
        out.push_str("---:|");
    }
    out.push_str("---:|---:|---:|---:|\n");
    for (config, jobs) in configs(rows) {
        let done: Vec<&&JobRow> = jobs
            .iter()
            .filter(|r| r.final_eval_loss.is_finite())
            .collect();
        let rel = mean_sd(done.iter().filter_map(|r| {
            e2e.get(&r.seed)
                .map(|e| 100.0 * (r.final_eval_loss / e.final_eval_loss - 1.0))
        }));
        let at_time = mean_sd(done.iter().filter_map(|r| {
            e2e.get(&r.seed)
                .map(|e| loss_at_time(&e.curve, r.train_wall_s))
        }));
        out.push_str(&format!(
            "| {config} | {}/{} | {} | {} | {} |",
            done.len(),
            jobs.len(),
            pm(mean_sd(done.iter().map(|r| r.final_eval_loss)), 4),
            match rel.2 {
                0 => "-".into(),
                _ => format!("{}%", pm(rel, 1)),
            },
            pm(at_time, 4),
        ));
        for t in &tasks {
            out.push_str(&format!(
                " {} |",
                pm(mean_sd(done.iter().map(|r| acc(&r.tasks, t))), 3)
            ));
        }
        out.push_str(&format!(
            " {} | {} | {} | {} |\n",
            pm(mean_sd(done.iter().map(|r| r.train_wall_s)), 0),
            pm(mean_sd(done.iter().map(|r| r.peak_mib)), 0),
            pm(mean_sd(done.iter().map(|r| r.snapcheck_mib)), 0),
            pm(mean_sd(done.iter().map(|r| r.flops / 1e12)), 1),
        ));
    }
    out.push_str(&per_stage_table(rows, &tasks));
    let failed: Vec<&JobRow> = rows
        .iter()
        .filter(|r| !r.final_eval_loss.is_finite())
        .collect();
    if !failed.is_empty() {
        out.push_str("\n## Jobs without results\n\n| job | state | error |\n|---|---|---|\n");
        for r in failed {
            out.push_str(&format!(
                "| {} | {} | {} |\n",
                r.name,
                r.state,
                r.error.clone().unwrap_or_default().replace('|', "\\|")
            ));
        }
    }
    out
}

/// Held-out loss (and the first task's accuracy) after each committed stage, mean over seeds:
/// the papers' per-layer tables.
fn per_stage_table(rows: &[JobRow], tasks: &[String]) -> String {
    let mut out = String::from("\n## After each stage (mean over seeds)\n\n");
    let metric = |s: &StageRow| match tasks.first() {
        Some(t) => format!("{:.4} / {:.3}", s.eval_loss, acc(&s.tasks, t)),
        None => format!("{:.4}", s.eval_loss),
    };
    out.push_str(&match tasks.first() {
        Some(t) => format!("Each cell: held-out loss / {t} acc of the stage's network.\n\n"),
        None => "Each cell: held-out loss of the stage's network.\n\n".into(),
    });
    for (config, jobs) in configs(rows) {
        let done: Vec<&&JobRow> = jobs.iter().filter(|r| !r.stages.is_empty()).collect();
        let Some(first) = done.first() else { continue };
        out.push_str(&format!("**{config}**: "));
        let cells: Vec<String> = first
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let stage_rows: Vec<&StageRow> =
                    done.iter().filter_map(|r| r.stages.get(i)).collect();
                let mean = StageRow {
                    name: s.name.clone(),
                    eval_loss: mean_sd(stage_rows.iter().map(|s| s.eval_loss)).0,
                    tasks: tasks
                        .iter()
                        .map(|t| {
                            let m = mean_sd(stage_rows.iter().map(|s| acc(&s.tasks, t))).0;
                            (t.clone(), m, f64::NAN)
                        })
                        .collect(),
                };
                format!("{} {}", s.name, metric(&mean))
            })
            .collect();
        out.push_str(&cells.join(" · "));
        out.push_str("\n\n");
    }
    out
}

/// Writes `results.csv`, `results.md` and the plots into `out`; returns the files written.
pub fn write(out: &Path, title: &str, rows: &[JobRow]) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let tasks = task_names(rows);
    let mut files = Vec::new();
    let mut put = |name: &str, text: String| -> std::io::Result<()> {
        let path = out.join(name);
        std::fs::write(&path, text)?;
        files.push(path);
        Ok(())
    };
    put("results.csv", csv(rows))?;
    put("results.md", markdown(title, rows))?;
    // Curves of the first finished seed of every grid point.
    let firsts: Vec<&JobRow> = configs(rows)
        .into_iter()
        .filter_map(|(_, jobs)| jobs.into_iter().find(|r| !r.curve.is_empty()))
        .collect();
    let by = |x: fn(&(f64, f64, f64)) -> f64| -> Vec<Line> {
        firsts
            .iter()
            .map(|r| Line {
                label: r.config.clone(),
                points: r.curve.iter().map(|c| (x(c), c.2)).collect(),
            })
            .collect()
    };
    let marks = firsts
        .iter()
        .find(|r| r.regime == SweepRegime::Segprop)
        .map(|r| r.boundaries.clone())
        .unwrap_or_default();
    put(
        "curves.svg",
        svg::lines(
            &format!("{title}: held-out loss, stages concatenated"),
            "global optimizer step",
            "held-out loss",
            &by(|c| c.0),
            &marks,
        ),
    )?;
    put(
        "curves_time.svg",
        svg::lines(
            &format!("{title}: held-out loss against training time"),
            "training wall time (s)",
            "held-out loss",
            &by(|c| c.1),
            &[],
        ),
    )?;
    // The frontier: quality against time, the radius for peak memory.
    let first_task = tasks.first().cloned();
    let y_label = match &first_task {
        Some(t) => format!("{t} accuracy"),
        None => "held-out loss".into(),
    };
    let quality = |r: &JobRow| match &first_task {
        Some(t) => acc(&r.tasks, t),
        None => r.final_eval_loss,
    };
    let groups: Vec<String> = {
        let mut g: Vec<String> = Vec::new();
        for r in ok(rows) {
            if !g.iter().any(|x| x == r.regime.name()) {
                g.push(r.regime.name().into());
            }
        }
        g
    };
    let max_peak = ok(rows).map(|r| r.peak_mib).fold(1.0, f64::max);
    let dots: Vec<Dot> = configs(rows)
        .into_iter()
        .filter_map(|(config, jobs)| {
            let done: Vec<&JobRow> = jobs
                .into_iter()
                .filter(|r| r.final_eval_loss.is_finite())
                .collect();
            let first = done.first()?;
            let label = match (first.r, first.k) {
                (Some(r), Some(k)) => format!("r{r} k{k}"),
                (Some(r), None) => format!("r{r}"),
                _ => config.clone(),
            };
            Some(Dot {
                label,
                x: mean_sd(done.iter().map(|r| r.train_wall_s)).0,
                y: mean_sd(done.iter().map(|r| quality(r))).0,
                size: mean_sd(done.iter().map(|r| r.peak_mib)).0 / max_peak,
                group: groups
                    .iter()
                    .position(|g| g == first.regime.name())
                    .unwrap_or(0),
            })
        })
        .collect();
    put(
        "frontier.svg",
        svg::scatter(
            &format!("{title}: {y_label} vs training time (radius: peak memory)"),
            "training wall time (s)",
            &y_label,
            &dots,
            &groups,
        ),
    )?;
    // Per committed stage.
    let stage_lines: Vec<Line> = firsts
        .iter()
        .map(|r| Line {
            label: r.config.clone(),
            points: r
                .stages
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let y = match tasks.first() {
                        Some(t) => acc(&s.tasks, t),
                        None => s.eval_loss,
                    };
                    (i as f64, y)
                })
                .collect(),
        })
        .collect();
    put(
        "per_stage.svg",
        svg::lines(
            &format!("{title}: {y_label} after each stage"),
            "stage (stage 1 or block, in order)",
            &y_label,
            &stage_lines,
            &[],
        ),
    )?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2e_loss_at_a_time_is_read_off_its_curve() {
        let curve = [(10.0, 5.0, 3.0), (20.0, 15.0, 2.0), (30.0, 25.0, 1.5)];
        assert_eq!(loss_at_time(&curve, 1.0), 3.0);
        assert!((loss_at_time(&curve, 10.0) - 2.5).abs() < 1e-12);
        assert_eq!(loss_at_time(&curve, 100.0), 1.5);
        assert!(loss_at_time(&[], 1.0).is_nan());
    }

    #[test]
    fn spread_is_the_sample_deviation() {
        let (m, sd, n) = mean_sd([1.0, 3.0, f64::NAN].into_iter());
        assert_eq!((m, n), (2.0, 2));
        assert!((sd - 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(pm((2.0, 0.5, 3), 2), "2.00 ± 0.50");
        assert_eq!(pm((f64::NAN, f64::NAN, 0), 2), "-");
    }
}

//! `segprop-coord sweep sweep.yaml`: a grid of jobs over one base spec (regimes x base depth p x
//! head depth r x segment size k x seeds), submitted through the coordinator, waited for, and
//! reported as a table (CSV, markdown) and SVG plots ([`report`]).
//!
//! The grid is expanded here ([`SweepSpec::jobs`]); [`run`] submits and collects; a job that
//! cannot be submitted or fails is reported with its error and the rest go on.

pub mod report;
pub mod run;
pub mod svg;

use std::path::{Path, PathBuf};

use segprop_core::spec::{ExitSpec, HeadPolicy, LwVariant, Regime};
use segprop_core::{JobSpec, StagePlan};
use serde::{Deserialize, Serialize};

/// The regimes a sweep compares, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepRegime {
    /// End-to-end.
    E2e,
    /// SegProp, head policy `persistent` (TMLR).
    Segprop,
    /// SegProp, head policy `reset` (ICLR).
    SegpropReset,
    /// Layer-wise, every block with its own local head.
    LwLocal,
    /// `lw_local` and a last stage that trains the LM head alone (TMLR B.2.3).
    LwLocalFc,
    /// Layer-wise with SegProp's stage 1 as a base prefix and the LM head alone above each block
    /// (ICLR "w/o LL").
    LwBase,
}

impl SweepRegime {
    pub fn name(self) -> &'static str {
        match self {
            SweepRegime::E2e => "e2e",
            SweepRegime::Segprop => "segprop",
            SweepRegime::SegpropReset => "segprop_reset",
            SweepRegime::LwLocal => "lw_local",
            SweepRegime::LwLocalFc => "lw_local_fc",
            SweepRegime::LwBase => "lw_base",
        }
    }

    /// Whether p and r shape the job (k only for SegProp).
    fn uses_depths(self) -> bool {
        matches!(
            self,
            SweepRegime::Segprop | SweepRegime::SegpropReset | SweepRegime::LwBase
        )
    }

    fn uses_segment_size(self) -> bool {
        matches!(self, SweepRegime::Segprop | SweepRegime::SegpropReset)
    }
}

/// What a user writes in `sweep.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    /// Prefix of every job's name.
    pub name: String,
    /// The base job spec (relative to the sweep file).
    pub base: PathBuf,
    pub regimes: Vec<SweepRegime>,
    /// p values (SegProp and `lw_base`); the base spec's when absent.
    #[serde(default)]
    pub base_depth: Vec<usize>,
    /// r values (SegProp and `lw_base`'s stage 1).
    #[serde(default)]
    pub head_layers: Vec<usize>,
    /// k values (SegProp).
    #[serde(default)]
    pub segment_size: Vec<usize>,
    /// Seeds (`seed` of every job); the base spec's when absent.
    #[serde(default)]
    pub seeds: Vec<u64>,
    /// Optimizer steps of every job, shared out over its stages (equal steps across regimes);
    /// absent: every regime keeps the base spec's exit rules.
    #[serde(default)]
    pub steps: Option<u64>,
    /// With `steps`: stage 1's share of them (SegProp, `lw_base`); the rest is split evenly
    /// over the later stages.
    #[serde(default = "default_stage1_share")]
    pub stage1_share: f64,
}

fn default_stage1_share() -> f64 {
    1.0 / 3.0
}

/// The checks `segprop-coord submit` makes, on the spec as it will be sent.
fn check(s: &JobSpec) -> Result<(), String> {
    let text = serde_yaml::to_string(s).map_err(|e| e.to_string())?;
    let checked = JobSpec::from_yaml_str(&text, &s.name).map_err(|e| e.to_string())?;
    let config = checked.resolve_model_config().map_err(|e| e.to_string())?;
    checked
        .validate_against_model(&config)
        .map_err(|e| format!("{}: {e}", s.name))
}

/// One job of the grid.
#[derive(Debug, Clone)]
pub struct SweepJob {
    pub regime: SweepRegime,
    /// p, r, k where the regime uses them.
    pub base_depth: Option<usize>,
    pub head_layers: Option<usize>,
    pub segment_size: Option<usize>,
    pub seed: u64,
    pub spec: JobSpec,
    /// Why this grid point cannot run (the spec's checks refused it); it is reported, not
    /// submitted, and the sweep goes on.
    pub refused: Option<String>,
}

impl SweepJob {
    /// The grid point without the seed: `segprop-p2-r2-k1`, `e2e`, `lw_base-p2-r2`.
    pub fn config_label(&self) -> String {
        let mut label = self.regime.name().to_string();
        if let Some(p) = self.base_depth {
            label.push_str(&format!("-p{p}"));
        }
        if let Some(r) = self.head_layers {
            label.push_str(&format!("-r{r}"));
        }
        if let Some(k) = self.segment_size {
            label.push_str(&format!("-k{k}"));
        }
        label
    }
}

fn invalid(source: &Path, field: &str, message: impl std::fmt::Display) -> String {
    format!("{}: {field}: {message}", source.display())
}

impl SweepSpec {
    /// Reads `path`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<(Self, JobSpec), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut spec: SweepSpec =
            serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if spec.base.is_relative() {
            spec.base = path.parent().unwrap_or(Path::new(".")).join(&spec.base);
        }
        let base =
            JobSpec::from_file(&spec.base).map_err(|e| invalid(path, "base", format!("{e}")))?;
        spec.check(path)?;
        Ok((spec, base))
    }

    fn check(&self, source: &Path) -> Result<(), String> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                source,
                "name",
                "must be non-empty and use only letters, digits, '-', '_' and '.'",
            ));
        }
        if self.regimes.is_empty() {
            return Err(invalid(source, "regimes", "name at least one regime"));
        }
        if !(self.stage1_share > 0.0 && self.stage1_share < 1.0) {
            return Err(invalid(source, "stage1_share", "must be in (0, 1)"));
        }
        if self.steps == Some(0) {
            return Err(invalid(source, "steps", "must be at least 1"));
        }
        if self.segment_size.contains(&0) {
            return Err(invalid(source, "segment_size", "values must be at least 1"));
        }
        Ok(())
    }

    /// Every job of the grid, in order: seeds innermost, so the first seed of every grid point
    /// comes early. A grid point a regime does not use (k for `e2e`) is not repeated; one the
    /// spec's checks refuse is kept with [`SweepJob::refused`] set.
    pub fn jobs(&self, base: &JobSpec) -> Result<Vec<SweepJob>, String> {
        let config = base
            .resolve_model_config()
            .map_err(|e| format!("base: {e}"))?;
        let n = config.num_layers;
        let or = |values: &Vec<usize>, default: usize| {
            if values.is_empty() {
                vec![default]
            } else {
                values.clone()
            }
        };
        let ps = or(&self.base_depth, base.segprop.base_depth);
        let rs = or(&self.head_layers, base.segprop.head_layers);
        let ks = or(&self.segment_size, base.segprop.segment_size);
        let seeds = if self.seeds.is_empty() {
            vec![base.seed]
        } else {
            self.seeds.clone()
        };
        let mut jobs = Vec::new();
        for &regime in &self.regimes {
            let mut points: Vec<(Option<usize>, Option<usize>, Option<usize>)> = Vec::new();
            for &p in &ps {
                for &r in &rs {
                    for &k in &ks {
                        let point = (
                            regime.uses_depths().then_some(p),
                            regime.uses_depths().then_some(r),
                            regime.uses_segment_size().then_some(k),
                        );
                        if !points.contains(&point) {
                            points.push(point);
                        }
                    }
                }
            }
            for (p, r, k) in points {
                for &seed in &seeds {
                    let mut job = SweepJob {
                        regime,
                        base_depth: p,
                        head_layers: r,
                        segment_size: k,
                        seed,
                        spec: base.clone(),
                        refused: None,
                    };
                    job.refused = self.shape(&mut job, n).err();
                    jobs.push(job);
                }
            }
        }
        Ok(jobs)
    }

    /// Sets the job's regime, depths, seed, name and (with `steps`) its stages' step budgets.
    fn shape(&self, job: &mut SweepJob, n: usize) -> Result<(), String> {
        let name = format!("{}-{}-s{}", self.name, job.config_label(), job.seed);
        let s = &mut job.spec;
        s.seed = job.seed;
        let p = job.base_depth.unwrap_or(s.segprop.base_depth);
        let r = job.head_layers.unwrap_or(s.segprop.head_layers);
        let k = job.segment_size.unwrap_or(s.segprop.segment_size);
        match job.regime {
            SweepRegime::E2e => s.regime = Regime::E2e,
            SweepRegime::Segprop | SweepRegime::SegpropReset => {
                s.regime = Regime::Segprop;
                s.segprop.base_depth = p;
                s.segprop.head_layers = r;
                s.segprop.segment_size = k;
                s.segprop.head_policy = match job.regime {
                    SweepRegime::SegpropReset => HeadPolicy::Reset,
                    _ => HeadPolicy::Persistent,
                };
            }
            SweepRegime::LwLocal | SweepRegime::LwLocalFc => {
                s.regime = Regime::Lw;
                s.lw.variant = LwVariant::LocalHeads;
                s.lw.base_depth = None;
                s.lw.head_layers = None;
                s.lw.stage1 = None;
                s.lw.final_head = match job.regime {
                    SweepRegime::LwLocalFc => {
                        Some(s.lw.final_head.clone().unwrap_or(s.lw.exit.clone()))
                    }
                    _ => None,
                };
            }
            SweepRegime::LwBase => {
                s.regime = Regime::Lw;
                s.lw.variant = LwVariant::BasePrefix;
                s.lw.base_depth = Some(p);
                s.lw.head_layers = Some(r);
                s.lw.stage1 = Some(s.segprop.exit.stage1.clone());
                s.lw.final_head = None;
            }
        }
        s.name = name;
        // The same checks `submit` makes: a grid point that cannot run is reported up front
        // (before the steps are shared over a plan it may not have).
        check(s)?;
        if let Some(steps) = self.steps {
            self.share_steps(s, n, steps);
            check(s)?;
        }
        Ok(())
    }

    /// Shares `steps` optimizer steps over the stages of `s`'s plan.
    fn share_steps(&self, s: &mut JobSpec, n: usize, steps: u64) {
        let with = |exit: &ExitSpec, max: u64| ExitSpec {
            max_steps: Some(max.max(1)),
            max_epochs: None,
            ..exit.clone()
        };
        let plan = StagePlan::new(s, n);
        let has_stage1 = matches!(
            plan.stages.first().map(|e| e.kind),
            Some(segprop_core::StageKind::Stage1 { .. })
        );
        let later = plan.stages.len() as u64 - u64::from(has_stage1);
        let stage1 = if has_stage1 {
            (steps as f64 * self.stage1_share).round() as u64
        } else {
            0
        };
        let each = (steps - stage1.min(steps)) / later.max(1);
        match s.regime {
            Regime::E2e => s.e2e.exit = with(&s.e2e.exit, steps),
            Regime::Segprop => {
                s.segprop.exit.stage1 = with(&s.segprop.exit.stage1, stage1);
                s.segprop.exit.segment = with(&s.segprop.exit.segment, each);
            }
            Regime::Lw => {
                if has_stage1 {
                    s.lw.stage1 = Some(with(&s.lw.stage1_exit(), stage1));
                }
                s.lw.exit = with(&s.lw.exit, each);
                if let Some(fc) = &s.lw.final_head {
                    s.lw.final_head = Some(with(fc, each));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> JobSpec {
        JobSpec::from_yaml_str(
            "version: 1\nname: b\nmodel: { preset: tiny, overrides: { num_layers: 8 } }\n\
             data: { corpus: builtin:synthetic, seq_len: 16, batch_size: 2 }\n\
             regime: segprop\nsegprop: { base_depth: 2, head_layers: 2 }\nseed: 5\n",
            "b",
        )
        .unwrap()
    }

    fn sweep(extra: &str) -> SweepSpec {
        serde_yaml::from_str(&format!("name: t\nbase: b.yaml\n{extra}")).unwrap()
    }

    #[test]
    fn grid_skips_axes_a_regime_does_not_use() {
        let s = sweep(
            "regimes: [e2e, segprop, lw_base]\nhead_layers: [0, 2]\nsegment_size: [1, 2]\n\
             seeds: [1, 2]\n",
        );
        let jobs = s.jobs(&base()).unwrap();
        let names: Vec<_> = jobs.iter().map(|j| j.spec.name.clone()).collect();
        // e2e: 2 seeds; segprop: 2 r x 2 k x 2 seeds; lw_base: 2 r x 2 seeds.
        assert_eq!(jobs.len(), 2 + 8 + 4, "{names:?}");
        assert_eq!(names[0], "t-e2e-s1");
        assert!(names.contains(&"t-segprop-p2-r0-k2-s2".to_string()));
        assert!(names.contains(&"t-lw_base-p2-r2-s1".to_string()));
        let reset = sweep("regimes: [segprop_reset]\n").jobs(&base()).unwrap();
        assert_eq!(reset[0].spec.segprop.head_policy, HeadPolicy::Reset);
        assert_eq!(reset[0].spec.seed, 5);
    }

    #[test]
    fn equal_steps_are_shared_over_each_plan() {
        let s = sweep("regimes: [e2e, segprop, lw_local, lw_local_fc, lw_base]\nsteps: 900\n");
        let jobs = s.jobs(&base()).unwrap();
        let total = |j: &SweepJob| -> u64 {
            let plan = StagePlan::new(&j.spec, 8);
            plan.stages
                .iter()
                .map(|e| {
                    let exit = match e.kind {
                        segprop_core::StageKind::E2e => &j.spec.e2e.exit,
                        segprop_core::StageKind::Stage1 { .. } if j.spec.regime == Regime::Lw => {
                            j.spec.lw.stage1.as_ref().unwrap()
                        }
                        segprop_core::StageKind::Stage1 { .. } => &j.spec.segprop.exit.stage1,
                        segprop_core::StageKind::Segment { .. } => &j.spec.segprop.exit.segment,
                        segprop_core::StageKind::LwHead => j.spec.lw.final_head.as_ref().unwrap(),
                        _ => &j.spec.lw.exit,
                    };
                    exit.max_steps.unwrap()
                })
                .sum()
        };
        for job in &jobs {
            let t = total(job);
            // Integer shares lose at most one step per stage.
            assert!((891..=900).contains(&t), "{}: {t}", job.spec.name);
        }
        assert_eq!(jobs[1].spec.segprop.exit.stage1.max_steps, Some(300));
        assert_eq!(jobs[1].spec.segprop.exit.segment.max_steps, Some(150));
    }

    #[test]
    fn bad_grid_points_are_refused_with_the_job_name_and_the_rest_kept() {
        let jobs = sweep("regimes: [segprop]\nbase_depth: [2, 7]\n")
            .jobs(&base())
            .unwrap();
        assert_eq!(jobs.len(), 2);
        assert!(jobs[0].refused.is_none());
        let err = jobs[1].refused.as_deref().unwrap();
        assert!(
            err.contains("t-segprop-p7-r2-k1-s5") && err.contains("base_depth"),
            "{err}"
        );
    }
}

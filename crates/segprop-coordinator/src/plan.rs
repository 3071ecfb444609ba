//! `segprop-coord plan`: the planner's comparison table (segprop_core::planner) for a job spec
//! or a model preset / HF `config.json`, as text or JSON.

use std::path::Path;

use segprop_core::planner::{self, Cluster, Plan, gib};
use segprop_core::{JobSpec, LlamaConfig};
use serde::Serialize;

/// What to plan and on what hardware.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub config: LlamaConfig,
    pub model_name: String,
    pub cluster: Cluster,
    pub seq_len: usize,
    pub base_depth: usize,
    pub head_layers: usize,
    pub segment_size: usize,
    pub bf16: bool,
    /// Tokens each stage (and e2e) trains on, for the schedule's FLOPs.
    pub tokens: f64,
}

impl PlanRequest {
    /// The model, sequence length, SegProp depths and gang size of `spec`.
    pub fn from_spec(spec: &JobSpec, cluster: Cluster) -> Result<Self, String> {
        let config = spec.resolve_model_config().map_err(|e| e.to_string())?;
        let gpus = spec.resources.devices_per_gang as u32;
        Ok(Self {
            model_name: spec.name.clone(),
            seq_len: spec.data.seq_len,
            base_depth: spec.segprop.base_depth,
            head_layers: spec.segprop.head_layers,
            segment_size: spec.segprop.segment_size,
            bf16: spec.resources.precision.is_half(),
            cluster: Cluster { gpus, ..cluster },
            tokens: 1e9,
            config,
        })
    }

    /// A preset name or the path of an HF `config.json` (or its directory).
    pub fn model(name: &str) -> Result<(LlamaConfig, String), String> {
        if let Some(config) = LlamaConfig::preset(name) {
            return Ok((config, name.to_string()));
        }
        let path = Path::new(name);
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| {
            format!(
                "--model {name}: not a preset ({}) and not a readable config.json: {e}",
                segprop_core::llama_config::PRESETS.join(", ")
            )
        })?;
        let config = LlamaConfig::from_hf_json(&text)
            .map_err(|e| format!("--model {}: {e}", file.display()))?;
        Ok((config, file.display().to_string()))
    }
}

/// One row of the comparison.
#[derive(Debug, Serialize)]
pub struct Row {
    /// The plan at the largest micro-batch that fits, or at micro-batch 1 when none does.
    pub plan: Plan,
    pub max_micro_batch: usize,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub num_params: u64,
    pub cluster: Cluster,
    pub seq_len: usize,
    pub base_depth: usize,
    pub head_layers: usize,
    pub segment_size: usize,
    pub precision: &'static str,
    pub rows: Vec<Row>,
    /// FLOPs of training every stage (and e2e) on `tokens` tokens.
    pub tokens_per_stage: f64,
    pub schedule_flops_e2e: f64,
    pub schedule_flops_segprop_snapcheck: f64,
    pub schedule_flops_segprop_recompute: f64,
}

pub fn report(req: &PlanRequest) -> Report {
    let workloads = planner::comparison(
        req.config.num_layers,
        req.base_depth,
        req.head_layers,
        req.segment_size,
    );
    let rows = workloads
        .iter()
        .map(|w| {
            match planner::max_micro_batch(
                &req.config,
                &req.cluster,
                w,
                req.seq_len,
                req.bf16,
                65_536,
            ) {
                Some(plan) => Row {
                    max_micro_batch: plan.micro_batch,
                    plan,
                },
                None => Row {
                    plan: planner::plan(&req.config, &req.cluster, w, 1, req.seq_len, req.bf16),
                    max_micro_batch: 0,
                },
            }
        })
        .collect();
    let (e2e, with, without) = planner::schedule_flops(
        &req.config,
        req.base_depth,
        req.head_layers,
        req.segment_size,
        req.seq_len,
        req.tokens,
    );
    Report {
        model: req.model_name.clone(),
        num_params: req.config.num_params(),
        cluster: req.cluster.clone(),
        seq_len: req.seq_len,
        base_depth: req.base_depth,
        head_layers: req.head_layers,
        segment_size: req.segment_size,
        precision: if req.bf16 { "bf16" } else { "f32" },
        rows,
        tokens_per_stage: req.tokens,
        schedule_flops_e2e: e2e,
        schedule_flops_segprop_snapcheck: with,
        schedule_flops_segprop_recompute: without,
    }
}

/// The report as the terminal table.
pub fn table(r: &Report) -> String {
    let c = &r.cluster;
    let mut out = format!(
        "{} ({:.1}B parameters), {} x {:.0} GiB GPUs, {:.0} GiB host RAM, seq {}, {}; SegProp p={} r={} k={}\n\n",
        r.model,
        r.num_params as f64 / 1e9,
        c.gpus,
        gib(c.gpu_mem_bytes),
        gib(c.host_ram_bytes),
        r.seq_len,
        r.precision,
        r.base_depth,
        r.head_layers,
        r.segment_size,
    );
    out.push_str(&format!(
        "{:<30} {:>9} {:>9} {:>9} {:>13} {:>12} {:>15}\n",
        "configuration", "max batch", "GPU GiB", "host GiB", "GFLOP/token", "tokens/s", "bound"
    ));
    for row in &r.rows {
        let p = &row.plan;
        let flops =
            p.forward_flops_per_token + p.backward_flops_per_token + p.recompute_flops_per_token;
        let batch = if row.max_micro_batch == 0 {
            "none".to_string()
        } else {
            row.max_micro_batch.to_string()
        };
        out.push_str(&format!(
            "{:<30} {:>9} {:>9.1} {:>9.1} {:>13.1} {:>12.0} {:>15}\n",
            p.workload.name,
            batch,
            gib(p.memory.gpu_total()),
            gib(p.memory.host),
            flops / 1e9,
            if row.max_micro_batch == 0 {
                0.0
            } else {
                p.tokens_per_s
            },
            p.bound.to_string(),
        ));
    }
    for row in r.rows.iter().filter(|row| row.max_micro_batch == 0) {
        let m = &row.plan.memory;
        out.push_str(&format!(
            "\n{} does not fit one sequence: per GPU {:.1} GiB (sharded state {:.1}, frozen \
             weights {:.1}, gathered units {:.1}, activations {:.1}, logits {:.1}, workspace {:.1}) \
             of {:.1} GiB; host {:.1} of {:.1} GiB\n",
            row.plan.workload.name,
            gib(m.gpu_total()),
            gib(m.sharded_state),
            gib(m.frozen_weights),
            gib(m.gathered),
            gib(m.activations),
            gib(m.logits),
            gib(m.workspace),
            gib(c.gpu_mem_bytes),
            gib(m.host),
            gib(c.host_ram_bytes),
        ));
    }
    out.push_str(&format!(
        "\nschedule FLOPs, every stage on {:.1e} tokens: e2e {:.3e}, SegProp with SnapCheck {:.3e} \
         ({:.2}x e2e), without {:.3e} ({:.2}x)\n",
        r.tokens_per_stage,
        r.schedule_flops_e2e,
        r.schedule_flops_segprop_snapcheck,
        r.schedule_flops_segprop_snapcheck / r.schedule_flops_e2e,
        r.schedule_flops_segprop_recompute,
        r.schedule_flops_segprop_recompute / r.schedule_flops_e2e,
    ));
    out.push_str(
        "assumptions: docs/planner.md (mixed precision, flash attention, FSDP prefetch of one \
         unit, CPU offload of master weights, moments and gradients)\n",
    );
    out
}

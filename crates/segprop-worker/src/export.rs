//! The `export` task: the final evaluation and the model in Hugging Face layout, the run's
//! summary, plot and metrics, each stored as an artifact under the job's key.

use burn::tensor::backend::AutodiffBackend;
use segprop_core::sched::{Artifact, Dispatch, TaskResult};
use segprop_train::checkpoint;
use segprop_train::metrics::{RecordingObserver, TrainEvent};
use segprop_train::{TrainError, Trainer};

use crate::artifacts::FetchError;
use crate::error::TaskError;
use crate::observe::{read_events, write_events};
use crate::task::{Succeeded, TaskContext};

impl TaskContext {
    pub(crate) fn export<B: AutodiffBackend>(
        &self,
        trainer: &mut Trainer<B>,
        a: &Dispatch,
        stage_metrics: &[Artifact],
    ) -> Result<Succeeded, TaskError> {
        let mut recorder = RecordingObserver::default();
        for (i, m) in stage_metrics.iter().enumerate() {
            let path = self.work_dir.join(format!("in/metrics-{i:03}.jsonl"));
            self.artifacts
                .fetch(&m.uri, Some(&m.checksum), &path)
                .map_err(|e| match e {
                    FetchError::Corrupt(m) => {
                        TaskError::Damaged(format!("stage metrics are damaged: {m}"))
                    }
                    FetchError::Unavailable(m) => TaskError::Unavailable(m),
                })?;
            recorder.events.extend(read_events(&path)?);
        }
        let out = self.work_dir.join("export");
        let wall_s: f64 = trainer.progress.records.iter().map(|r| r.wall_s).sum();
        let summary =
            segprop_train::run::finish_run(trainer, &out, &recorder, wall_s, Some(5_000_000_000))?;
        let mut events = recorder.events;
        events.push(TrainEvent::RunFinished(summary.clone()));
        write_events(&out.join("metrics.jsonl"), &events)?;
        // Everything finish_run wrote (model/, summary.json, summary.txt, loss.svg) and the
        // job's metrics, each as its own artifact under the job's key.
        let mut names: Vec<_> = std::fs::read_dir(&out)
            .map_err(TrainError::io(&out))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let job_key = a.job_dir.trim_end_matches('/');
        let (mut model, mut metrics) = (None, None);
        for name in names {
            let local = out.join(&name);
            let digest = checkpoint::checksum_dir(&local)?;
            let stored = self
                .artifacts
                .put(&format!("{job_key}/{name}"), &local, &digest)
                .map_err(TaskError::Unavailable)?;
            match name.as_str() {
                "model" => model = Some(stored),
                "metrics.jsonl" => metrics = Some(stored),
                _ => {}
            }
        }
        let model = model.ok_or_else(|| TaskError::Damaged("export wrote no model".into()))?;
        tracing::info!(model = %model.uri, store = self.artifacts.store.location(), eval_loss = summary.final_eval_loss, "model exported");
        Ok(Succeeded {
            outputs: vec![model],
            record_json: serde_json::to_string(&summary).unwrap_or_default(),
            result: TaskResult {
                steps: summary.total_steps,
                final_eval_loss: Some(summary.final_eval_loss),
                final_num_layers: summary.final_num_layers as u32,
                ..Default::default()
            },
            early_exit: false,
            metrics,
        })
    }
}

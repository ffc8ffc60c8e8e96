"""`switchx eval`: a run's held-out metrics, in eval mode (no dropout, MoeConfig.eval_capacity_factor).

    result = evaluate_run("runs/pretrain")     # also writes runs/pretrain/eval.json

A pretraining run is scored on its held-out split (the same span-corrupted batches its training loop
evaluates, TrainConfig.eval_batches of them); a fine-tuning run on its tasks' validation splits (token
accuracy, negative log perplexity and exact match of greedy decodes, as during fine-tuning). Metrics:
neg_log_perplexity = -(mean cross-entropy per target token), token_accuracy, and per MoE layer the router
metrics (dropped fraction, router confidence and entropy, expert usage, load-balancing and router z-losses),
each averaged over target tokens.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


from switchx.config import FinetuneConfig, TaskConfig, TrainConfig
from switchx.data.tasks import load_task
from switchx.parallel.mesh import MeshConfig, make_mesh
from switchx.parallel.partitioning import Partitioner
from switchx.train import restore
from switchx.train.finetune import evaluate_tasks
from switchx.train.loop import load_data
from switchx.train.metrics import held_out_metrics

EVAL_FILE = "eval.json"


def evaluate_run(path: str | Path, model_changes: dict | None = None, moe_changes: dict | None = None,
                 train_changes: dict | None = None, mesh_config: MeshConfig = MeshConfig(),
                 write: bool = True) -> dict:
  """Held-out metrics of the newest checkpoint of the run at `path` (or of RUN/best). `*_changes` alter the
  saved configs (e.g. {"eval_capacity_factor": 1.0} for moe_changes, {"eval_batches": 32} for
  train_changes); a change to the architecture is an error naming the field."""
  path = Path(path)
  run_dir, _ = restore.checkpoint_dir(path)
  record = restore.read_record(run_dir)
  saved = restore.model_config_from(record["model"], str(run_dir / restore.CONFIG_FILE))
  config = restore.apply_overrides(saved, model_changes, moe_changes)
  train = dataclasses.replace(TrainConfig(**record["train"]), **(train_changes or {}))
  partitioner = Partitioner(make_mesh(mesh_config))
  partitioner.check_batch(train.batch_size)

  if "finetune" in record:
    result = _evaluate_finetuned(path, record, config, train, partitioner)
  else:
    _, _, batches = load_data(restore.data_config_from(record["data"]), train)
    loaded = restore.load_model(path, partitioner)
    run = restore.build_run(config, train, partitioner, batches[0]["encoder_input_tokens"].shape[1],
                            batches[0]["decoder_target_tokens"].shape[1])
    result = {"checkpoint": loaded.source, "step": loaded.step, **held_out_metrics(run, loaded.params, batches)}
  result["eval_capacity_factor"] = config.moe.eval_capacity_factor if config.is_sparse else None
  if write:
    (run_dir / EVAL_FILE).write_text(json.dumps(result, indent=1))
  return result


def _evaluate_finetuned(path: Path, record: dict, config, train, partitioner) -> dict:
  fields = dict(record["finetune"])
  finetune_config = FinetuneConfig(**{**fields, "tasks": tuple(TaskConfig(**t) for t in fields["tasks"])})
  tokenizer = restore.load_tokenizer(path)
  tasks = [load_task(t, tokenizer, train.inputs_length, train.targets_length) for t in finetune_config.tasks]
  loaded = restore.load_model(path, partitioner)
  run = restore.build_run(config, train, partitioner)
  metrics = evaluate_tasks(run, loaded.params, tasks, tokenizer, train, finetune_config)
  return {"checkpoint": loaded.source, "step": loaded.step, **metrics}

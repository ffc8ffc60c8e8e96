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

import jax
import numpy as np

from switchx.config import TrainConfig
from switchx.parallel.mesh import MeshConfig, make_mesh
from switchx.parallel.partitioning import Partitioner
from switchx.train import restore

EVAL_FILE = "eval.json"
ROUTER_KEYS = ("dropped_fraction", "router_confidence", "router_entropy", "load_balance_loss", "router_z_loss",
               "expert_usage", "dropped_fraction_by_rank")


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
    from switchx.train.loop import load_data
    _, _, batches = load_data(restore.data_config_from(record["data"]), train)
    loaded = restore.load_model(path, partitioner)
    run = restore.build_run(config, train, partitioner, batches[0]["encoder_input_tokens"].shape[1],
                            batches[0]["decoder_target_tokens"].shape[1])
    result = {"checkpoint": loaded.source, "step": loaded.step, **held_out_metrics(run, loaded.params, batches)}
  result["eval_capacity_factor"] = config.moe.eval_capacity_factor if config.is_sparse else None
  if write:
    (run_dir / EVAL_FILE).write_text(json.dumps(result, indent=1))
  return result


def held_out_metrics(run, params, batches) -> dict:
  """Token-weighted means over batches: neg_log_perplexity, token_accuracy, router metrics per layer."""
  totals, tokens = {}, 0.0
  for batch in batches:
    metrics = jax.device_get(run.eval_step(params, run.shard_batch(batch)))
    n = float(metrics["num_target_tokens"])
    tokens += n
    for key, value in metrics.items():
      if key in ("cross_entropy_loss", "accuracy", "load_balance_loss", "router_z_loss") or (
          key.startswith("router/") and key.rsplit("/", 1)[-1] in ROUTER_KEYS):
        totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64) * n
  mean = {key: value / max(tokens, 1.0) for key, value in totals.items()}
  router = {}
  for key, value in mean.items():
    if key.startswith("router/") and key.count("/") >= 3:      # router/<stack>/<layer>/<metric>
      layer, metric = key[len("router/"):].rsplit("/", 1)
      router.setdefault(layer, {})[metric] = np.asarray(value).tolist()
  result = {"neg_log_perplexity": -float(mean["cross_entropy_loss"]), "token_accuracy": float(mean["accuracy"]),
            "num_target_tokens": tokens, "batches": len(batches)}
  if router:
    result["dropped_fraction"] = float(mean["router/dropped_fraction"])
    result["router"] = router
  return result


def _evaluate_finetuned(path: Path, record: dict, config, train, partitioner) -> dict:
  from switchx.config import FinetuneConfig, TaskConfig
  from switchx.data.tasks import load_task
  from switchx.train.finetune import evaluate_tasks
  fields = dict(record["finetune"])
  finetune_config = FinetuneConfig(**{**fields, "tasks": tuple(TaskConfig(**t) for t in fields["tasks"])})
  tokenizer = restore.load_tokenizer(path)
  tasks = [load_task(t, tokenizer, train.inputs_length, train.targets_length) for t in finetune_config.tasks]
  loaded = restore.load_model(path, partitioner)
  run = restore.build_run(config, train, partitioner)
  metrics = evaluate_tasks(run, loaded.params, tasks, tokenizer, train, finetune_config)
  return {"checkpoint": loaded.source, "step": loaded.step, **metrics}

"""Metric writers: JSON lines (one object per logged step) and TensorBoard event files (tensorboardX, no
TensorFlow needed). Only process 0 writes. Vector metrics (expert usage [E], dropped fraction by rank [K]) go
to JSON as lists and to TensorBoard as one scalar per entry plus a histogram."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np


def to_python(value):
  array = np.asarray(value)
  return array.item() if array.ndim == 0 else array.tolist()


class MetricWriter:
  def __init__(self, directory: str | Path, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(directory / "metrics.jsonl", "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(directory / "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for name, value in metrics.items():
      value = to_python(value)
      row[prefix + name] = value
      if self._tb is None:
        continue
      if isinstance(value, list):
        for i, v in enumerate(value):
          self._tb.add_scalar(f"{prefix}{name}/{i}", v, step)
        self._tb.add_histogram(prefix + name, np.asarray(value), step)
      elif isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(prefix + name, value, step)
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def read_metrics(directory: str | Path) -> list[dict]:
  path = Path(directory) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# --- held-out metrics (the training loop's evaluation and `switchx eval`) ----------------------------------
ROUTER_KEYS = ("dropped_fraction", "router_confidence", "router_entropy", "load_balance_loss", "router_z_loss",
               "expert_usage", "dropped_fraction_by_rank", "load_cv", "max_mean_load", "idle_experts", "router_bias")


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
  for layer_metrics in router.values():   # over every held-out token: experts none of them chose
    if "expert_usage" in layer_metrics:
      layer_metrics["dead_experts"] = int(np.sum(np.asarray(layer_metrics["expert_usage"]) == 0))
  result = {"neg_log_perplexity": -float(mean["cross_entropy_loss"]), "token_accuracy": float(mean["accuracy"]),
            "num_target_tokens": tokens, "batches": len(batches)}
  if router:
    result["dropped_fraction"] = float(mean["router/dropped_fraction"])
    result["router"] = router
  return result

"""Metric writers: JSON lines (one object per logged step) and TensorBoard event files (tensorboardX, no
TensorFlow needed). Only process 0 writes. Vector metrics (expert usage [E], dropped fraction by rank [K]) go
to JSON as lists and to TensorBoard as one scalar per entry plus a histogram."""

from __future__ import annotations

import json
import math
from pathlib import Path

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

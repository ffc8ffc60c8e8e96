"""Fair timing on a noisy shared machine: programs alternate (A B A B ...) and we report medians of per-round
ratios, so drift over minutes (up to 1.5x here) cancels instead of favouring whoever ran first."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np


def time_once(step: Callable[[], None], repeats: int) -> float:
  """Seconds per call of `step` (which must block until its work is done), over `repeats` calls."""
  start = time.perf_counter()
  for _ in range(repeats):
    step()
  return (time.perf_counter() - start) / repeats


def alternate(programs: dict[str, Callable[[], None]], rounds: int, repeats: int, warmup: int = 2) -> dict:
  """{name: [seconds per step, one per round]}; every program runs `warmup` untimed calls first."""
  for step in programs.values():
    for _ in range(warmup):
      step()
  times = {name: [] for name in programs}
  for _ in range(rounds):
    for name, step in programs.items():
      times[name].append(time_once(step, repeats))
  return times


def median_ratio(times: dict, numerator: str, denominator: str) -> float:
  """Median over rounds of time[numerator] / time[denominator]."""
  return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def copy_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
  """Bytes per second a plain memory copy moves (read + write counted), best of `repeats`."""
  source = np.ones(num_bytes // 8, np.float64)
  target = np.empty_like(source)
  best = min(time_once(lambda: np.copyto(target, source), 1) for _ in range(repeats))
  return 2 * source.nbytes / best

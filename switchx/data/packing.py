"""Packing (inputs, targets) examples into fixed-length rows of an encoder-decoder batch.

Several short examples share a row; `*_segment_ids` tell them apart (1, 2, ... per row, 0 = padding) so attention
can be masked to within a segment, and `*_positions` restart at 0 in each segment. Example of one packed row with
targets (7 8 1) and (9 1), targets_length 6:

    decoder_target_tokens  7 8 1 9 1 0
    decoder_input_tokens   0 7 8 0 9 0     shifted right within each segment; 0 starts every segment
    decoder_segment_ids    1 1 1 2 2 0
    decoder_positions      0 1 2 0 1 0
    decoder_loss_weights   1 1 1 1 1 0

A mixture of tasks (data/tasks.py) also fills `encoder_task_ids` / `decoder_task_ids` (TASK_KEYS): each token's
task index, 0 at padding, which task-routed MoE layers read (MoeConfig.route_by="task").

Rows are filled greedily, first fit in arrival order, so packing is deterministic. An example longer than the
row is an error rather than truncated: cutting a span-corrupted example would drop sentinels from the inputs
whose spans stay in the targets (or the reverse), and the pipeline already sizes examples to fit.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BATCH_KEYS = (
    "encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
    "decoder_target_tokens", "decoder_input_tokens", "decoder_segment_ids", "decoder_positions",
    "decoder_loss_weights",
)
TASK_KEYS = ("encoder_task_ids", "decoder_task_ids")


class RowPacker:
  """Places examples into `num_rows` rows of `inputs_length` / `targets_length` tokens.

  `add` returns False, placing nothing, once an example fits no row and all rows are open; the caller then
  takes `batch()` and starts the next batch with that example. With `pack=False` each example gets its own row.
  """

  def __init__(self, num_rows: int, inputs_length: int, targets_length: int, pack: bool = True,
               with_task_ids: bool = False):
    if num_rows <= 0:
      raise ValueError(f"num_rows must be positive, got {num_rows}.")
    self.num_rows, self.inputs_length, self.targets_length, self.pack = (
        num_rows, inputs_length, targets_length, pack)
    self.with_task_ids = with_task_ids            # batches also carry TASK_KEYS
    self._rows: list[list[tuple[np.ndarray, np.ndarray, int]]] = []  # examples of each open row, in order
    self._free: list[list[int]] = []  # [free inputs slots, free targets slots] of each open row

  def add(self, inputs: np.ndarray, targets: np.ndarray, task: int = 0) -> bool:
    """Places one example (of task index `task`, kept when with_task_ids); False when it fits no row."""
    num_inputs, num_targets = len(inputs), len(targets)
    if not 0 < num_inputs <= self.inputs_length or not 0 < num_targets <= self.targets_length:
      raise ValueError(
          f"example with {num_inputs} input and {num_targets} target tokens does not fit rows of "
          f"inputs_length={self.inputs_length}, targets_length={self.targets_length} (empty examples are "
          "rejected too). Raise the lengths or shorten the examples before packing."
      )
    if self.pack:
      for row, free in zip(self._rows, self._free):
        if num_inputs <= free[0] and num_targets <= free[1]:
          row.append((inputs, targets, task))
          free[0] -= num_inputs
          free[1] -= num_targets
          return True
    if len(self._rows) == self.num_rows:
      return False
    self._rows.append([(inputs, targets, task)])
    self._free.append([self.inputs_length - num_inputs, self.targets_length - num_targets])
    return True

  @property
  def num_open_rows(self) -> int:
    return len(self._rows)

  @property
  def num_examples(self) -> int:
    return sum(len(row) for row in self._rows)

  def batch(self) -> dict[str, np.ndarray]:
    """The rows as arrays [num_rows, length]; rows never opened are all padding."""
    batch = _rows_to_arrays(self._rows, self.num_rows, self.inputs_length, self.targets_length)
    if not self.with_task_ids:
      return batch
    for key, side in zip(TASK_KEYS, ("encoder", "decoder")):
      segments = batch[f"{side}_segment_ids"]                                # [rows, length]: 1, 2, ... per example
      tasks = np.zeros((self.num_rows, segments.shape[1] + 1), np.int32)     # column 0: padding's task, 0
      for r, examples in enumerate(self._rows):
        tasks[r, 1:len(examples) + 1] = [task for _, _, task in examples]
      batch[key] = np.take_along_axis(tasks, segments, axis=1)
    return batch


def pack_examples(examples: Iterable[tuple[np.ndarray, np.ndarray]], inputs_length: int, targets_length: int,
                  pack: bool = True) -> dict[str, np.ndarray]:
  """All `examples` in as many rows as they need (first fit, or one per row with pack=False)."""
  examples = list(examples)
  packer = RowPacker(max(len(examples), 1), inputs_length, targets_length, pack)
  for inputs, targets in examples:
    packer.add(inputs, targets)  # Never False: there are as many rows as examples.
  return {key: array[:packer.num_open_rows] for key, array in packer.batch().items()}


def _rows_to_arrays(rows, num_rows: int, inputs_length: int, targets_length: int) -> dict[str, np.ndarray]:
  batch = {key: np.zeros((num_rows, targets_length if key.startswith("decoder") else inputs_length), np.int32)
           for key in BATCH_KEYS}
  for r, examples in enumerate(rows):
    inputs = [np.asarray(i, np.int32) for i, _, _ in examples]
    targets = [np.asarray(t, np.int32) for _, t, _ in examples]
    # Shifting each segment separately keeps the previous segment's last token out of the next one's start.
    shifted = [np.concatenate([[0], t[:-1]]) for t in targets]
    for side, parts in (("encoder", inputs), ("decoder", targets)):
      n = sum(len(p) for p in parts)
      batch[f"{side}_segment_ids"][r, :n] = np.concatenate(
          [np.full(len(p), k + 1) for k, p in enumerate(parts)])
      batch[f"{side}_positions"][r, :n] = np.concatenate([np.arange(len(p)) for p in parts])
    batch["encoder_input_tokens"][r, :sum(map(len, inputs))] = np.concatenate(inputs)
    batch["decoder_target_tokens"][r, :sum(map(len, targets))] = np.concatenate(targets)
    batch["decoder_input_tokens"][r, :sum(map(len, targets))] = np.concatenate(shifted)
  batch["decoder_loss_weights"] = (batch["decoder_segment_ids"] > 0).astype(np.float32)
  return batch

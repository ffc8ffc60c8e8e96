"""Fine-tuning data: (input, target) text pairs from tasks, mixed at their rates into packed batches.

    tasks = [load_task(TaskConfig(name="topics", train_path="train.jsonl", validation_path="validation.jsonl"),
                       tokenizer, inputs_length=64, targets_length=8)]
    mixture = Mixture(tasks, batch_size=32, inputs_length=64, targets_length=8, seed=0)
    batch = next(mixture)                      # the pretraining pipeline's batch keys (data/packing.py), and
                                               # each token's task index (encoder_task_ids, decoder_task_ids)

Each example is tokenized with the model's tokenizer as T5 does: ids of (input_prefix + input) then EOS, ids of
target then EOS, both cut to the row lengths (EOS kept). The mixture is deterministic and checkpointable like
the pretraining pipeline: draw n picks its task from a random stream of (seed, n); a task's j-th draw is
example j mod size of its epoch j // size, in a permutation drawn from (seed, task, epoch). Its state is the
draw count and each task's use count (get_state / set_state), saved in the checkpoint meta.

`docstring_task` / `write_docstring_task` build a small offline task from the standard library: which module
(of `num_classes`, balanced, so chance is 1 / num_classes) a docstring comes from.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sysconfig
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from switchx.config import TaskConfig
from switchx.data.corpus import _read_utf8, json_records, tfds_source, write_atomically
from switchx.data.packing import RowPacker
from switchx.data.tokenizer import EOS_ID

_CHOICE_STREAM = 0
_SHUFFLE_STREAM = 1
_CHOICE_BLOCK = 4096          # task choices drawn per block of draws
_STATE_VERSION = 1


# --- reading ---------------------------------------------------------------------------------------------------
def read_pairs(task: TaskConfig, split: str) -> list[tuple[str, str]]:
  """(input, target) texts of a task's "train" or "validation" split; [] when the task has no validation data."""
  if split not in ("train", "validation"):
    raise ValueError(f"split {split!r}: expected 'train' or 'validation'.")
  if task.source == "tfds":
    name = task.train_split if split == "train" else task.validation_split
    inputs = tfds_source(task.tfds_name, task.tfds_data_dir, name, task.input_field)
    targets = tfds_source(task.tfds_name, task.tfds_data_dir, name, task.target_field)
    pairs = list(zip(inputs, targets))
    if not pairs:
      raise ValueError(f"task {task.name!r}: split {name!r} of {task.tfds_name} holds no examples.")
    return pairs
  path = task.train_path if split == "train" else task.validation_path
  if not path:
    return []
  return read_jsonl_pairs(Path(path), task.input_field, task.target_field, task.name)


def read_jsonl_pairs(path: Path, input_field: str = "input", target_field: str = "target",
                     task_name: str = "") -> list[tuple[str, str]]:
  """Pairs from a JSON-lines file of objects with string `input_field` and `target_field`."""
  label = f"task {task_name!r}: {path}" if task_name else str(path)
  if not path.is_file():
    raise FileNotFoundError(f"{label}: no such file. Check the path (relative paths start at {Path.cwd()}).")
  pairs = []
  example = f'{{"{input_field}": "...", "{target_field}": "..."}}'
  for line_number, record in json_records(label, _read_utf8(path), example):
    for field in (input_field, target_field):
      if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise ValueError(f"{label}, line {line_number}: no string field {field!r}. Set TaskConfig.input_field "
                         "/ target_field to the names your file uses.")
    pairs.append((record[input_field], record[target_field]))
  if not pairs:
    raise ValueError(f"{label}: the file holds no examples (it is empty or only blank lines).")
  return pairs


def encode_pair(tokenizer, input_text: str, target_text: str, inputs_length: int,
                targets_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Input and target ids, each ended by EOS and cut to its length (EOS kept)."""
  inputs = tokenizer.encode(input_text)[: inputs_length - 1] + [EOS_ID]
  targets = tokenizer.encode(target_text)[: targets_length - 1] + [EOS_ID]
  return np.asarray(inputs, np.int32), np.asarray(targets, np.int32)


@dataclasses.dataclass
class Task:
  """A task read and tokenized: training examples (ids) and validation pairs (texts and ids)."""

  name: str
  rate: float
  train: list[tuple[np.ndarray, np.ndarray]]
  validation_texts: list[tuple[str, str]]
  validation: list[tuple[np.ndarray, np.ndarray]]


def load_task(task: TaskConfig, tokenizer, inputs_length: int, targets_length: int) -> Task:
  """Reads both splits (checking them) and tokenizes them with the model's tokenizer."""
  encode = lambda pairs: [encode_pair(tokenizer, task.input_prefix + x, y, inputs_length, targets_length)
                          for x, y in pairs]
  train = read_pairs(task, "train")
  validation = read_pairs(task, "validation")
  prefixed = [(task.input_prefix + x, y) for x, y in validation]
  return Task(task.name, task.rate, encode(train), prefixed, encode(validation))


def validation_batches(task: Task, batch_size: int, inputs_length: int, targets_length: int,
                       limit: int = 0, task_id: int | None = None) -> list[dict[str, np.ndarray]]:
  """The first `limit` (0: all) validation examples, one per row, in batches of batch_size rows (the last
  batch padded with empty rows, which weigh nothing). task_id: the task's index in its mixture, given as the
  batches' TASK_KEYS (None: no task ids)."""
  examples = task.validation[:limit] if limit else task.validation
  batches = []
  for start in range(0, len(examples), batch_size):
    packer = RowPacker(batch_size, inputs_length, targets_length, pack=False, with_task_ids=task_id is not None)
    for inputs, targets in examples[start:start + batch_size]:
      packer.add(inputs, targets, task_id or 0)
    batches.append(packer.batch())
  return batches


# --- the mixture ---------------------------------------------------------------------------------------------
class Mixture:
  """Endless iterator of packed batches of examples drawn from tasks at their rates (see the module doc).

  Process p of n takes draws p, p + n, ... (all processes walk the same draws, so use counts agree)."""

  def __init__(self, tasks: Sequence[Task], *, batch_size: int, inputs_length: int, targets_length: int,
               seed: int, pack: bool = True, process_index: int = 0, process_count: int = 1):
    if not tasks:
      raise ValueError("a mixture needs at least one task.")
    for task in tasks:
      if not task.train:
        raise ValueError(f"task {task.name!r} has no training examples.")
      if not (np.isfinite(task.rate) and task.rate > 0):
        raise ValueError(f"task {task.name!r}: rate {task.rate!r} must be > 0.")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}.")
    self.tasks = list(tasks)
    self.batch_size, self.inputs_length, self.targets_length = batch_size, inputs_length, targets_length
    self.seed, self.pack = int(seed), pack
    self.process_index, self.process_count = process_index, process_count
    rates = np.asarray([t.rate for t in self.tasks], np.float64)
    self.probabilities = rates / rates.sum()
    self._draws = 0                                   # draws walked so far (all processes')
    self._uses = [0] * len(self.tasks)                # examples taken from each task so far
    self._choice_cache: tuple[int, np.ndarray] | None = None
    self._order_cache: dict[tuple[int, int], np.ndarray] = {}
    self._skip_foreign_draws()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    packer = RowPacker(self.batch_size, self.inputs_length, self.targets_length, self.pack, with_task_ids=True)
    # The example that no longer fits stays unconsumed: the next batch starts with it.
    while packer.add(*self._peek(), self._task_of(self._draws)):
      self._consume()
    return packer.batch()

  def _task_of(self, draw: int) -> int:
    block, offset = divmod(draw, _CHOICE_BLOCK)
    if self._choice_cache is None or self._choice_cache[0] != block:
      rng = np.random.default_rng([self.seed, _CHOICE_STREAM, block])
      self._choice_cache = (block, rng.choice(len(self.tasks), size=_CHOICE_BLOCK, p=self.probabilities))
    return int(self._choice_cache[1][offset])

  def _example(self, task: int, use: int) -> tuple[np.ndarray, np.ndarray]:
    examples = self.tasks[task].train
    epoch, position = divmod(use, len(examples))
    if (task, epoch) not in self._order_cache:
      if len(self._order_cache) > 4 * len(self.tasks):
        self._order_cache.clear()
      rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, task, epoch])
      self._order_cache[(task, epoch)] = rng.permutation(len(examples))
    return examples[int(self._order_cache[(task, epoch)][position])]

  def _peek(self) -> tuple[np.ndarray, np.ndarray]:
    task = self._task_of(self._draws)
    return self._example(task, self._uses[task])

  def _consume(self) -> None:
    self._uses[self._task_of(self._draws)] += 1
    self._draws += 1
    self._skip_foreign_draws()

  def _skip_foreign_draws(self) -> None:
    """Walks past the draws of other processes (counting their uses) to this process's next draw."""
    while self._draws % self.process_count != self.process_index:
      self._uses[self._task_of(self._draws)] += 1
      self._draws += 1

  def task_counts(self) -> dict[str, int]:
    """Examples taken from each task so far (all processes)."""
    return {task.name: uses for task, uses in zip(self.tasks, self._uses)}

  def get_state(self) -> dict:
    """JSON-serialisable position, plus the settings it is only valid for."""
    return {"version": _STATE_VERSION, "draws": self._draws, "uses": list(self._uses), **self._fingerprint()}

  def set_state(self, state: dict) -> None:
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"mixture state version {state.get('version')!r}, expected {_STATE_VERSION}.")
    mismatched = {key: (state.get(key), value) for key, value in self._fingerprint().items()
                  if state.get(key) != value}
    if mismatched:
      details = ", ".join(f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in mismatched.items())
      raise ValueError(f"mixture state is from different tasks or settings ({details}).")
    self._draws, self._uses = int(state["draws"]), [int(u) for u in state["uses"]]

  def _fingerprint(self) -> dict:
    return {"seed": self.seed, "tasks": [t.name for t in self.tasks], "rates": [t.rate for t in self.tasks],
            "sizes": [len(t.train) for t in self.tasks], "batch_size": self.batch_size,
            "inputs_length": self.inputs_length, "targets_length": self.targets_length, "pack": self.pack,
            "process_index": self.process_index, "process_count": self.process_count}


# --- an offline task: which standard-library module a docstring comes from ---------------------------------
# Candidate classes, in order: label -> stdlib files (globs). Modules with distinctive vocabularies and many
# docstrings in every recent Python; the first `num_classes` with enough docstrings are used.
DOCSTRING_MODULES = {
    "asyncio": ("asyncio/*.py",),
    "email": ("email/*.py", "email/mime/*.py"),
    "tkinter": ("tkinter/*.py",),
    "decimal": ("_pydecimal.py",),
    "logging": ("logging/*.py",),
    "turtle": ("turtle.py",),
    "xml": ("xml/**/*.py",),
    "unittest": ("unittest/*.py",),
}
_MIN_DOCSTRING_CHARS = 40


def _module_docstrings(globs: Sequence[str]) -> list[str]:
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  texts = []
  for path in sorted({p for pattern in globs for p in stdlib.glob(pattern)}):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
          texts.append(" ".join(doc.split()))
  return list(dict.fromkeys(texts))                   # distinct, in file order


def docstring_task(num_classes: int = 4, max_words: int = 32, per_class: int = 200,
                   validation_fraction: float = 0.2, seed: int = 0, prefix: str = "module: ") -> dict:
  """A balanced `num_classes`-way classification: input = prefix + the first max_words words of a standard
  library docstring, target = its module's name (one word). Every class has the same number of examples
  (at most per_class) in each split, so chance accuracy is exactly 1 / num_classes.

  -> {"train": [{"input", "target"}, ...], "validation": [...], "labels": [...], "chance": 1 / num_classes}.
  """
  if not 2 <= num_classes <= len(DOCSTRING_MODULES):
    raise ValueError(f"num_classes={num_classes}: choose 2..{len(DOCSTRING_MODULES)}.")
  if not 0 < validation_fraction < 1:
    raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1).")
  found = {label: _module_docstrings(globs) for label, globs in DOCSTRING_MODULES.items()}
  labels = [label for label, texts in found.items() if len(texts) >= 20][:num_classes]
  if len(labels) < num_classes:
    raise ValueError(f"this Python's standard library has only {len(labels)} of the candidate modules with "
                     f"enough docstrings; use num_classes <= {len(labels)}.")
  size = min(per_class, *(len(found[label]) for label in labels))
  num_validation = max(1, round(size * validation_fraction))
  rng = np.random.default_rng(seed)
  splits = {"train": [], "validation": []}
  for label in labels:
    texts = found[label]
    for rank, index in enumerate(rng.permutation(len(texts))[:size]):
      words = texts[index].split()[:max_words]
      example = {"input": prefix + " ".join(words), "target": label}
      splits["validation" if rank < num_validation else "train"].append(example)
  for examples in splits.values():
    order = rng.permutation(len(examples))
    examples[:] = [examples[i] for i in order]
  return {**splits, "labels": labels, "chance": 1.0 / num_classes}


def write_docstring_task(directory: str | Path, **kwargs) -> dict:
  """Writes docstring_task(**kwargs) as directory/train.jsonl and directory/validation.jsonl.

  -> {"train_path", "validation_path", "labels", "chance", "num_train", "num_validation"}.
  """
  directory = Path(directory)
  task = docstring_task(**kwargs)
  paths = {}
  for split in ("train", "validation"):
    path = directory / f"{split}.jsonl"
    write_atomically(path, "".join(json.dumps(e) + "\n" for e in task[split]).encode("utf-8"))
    paths[f"{split}_path"] = str(path)
  return {**paths, "labels": task["labels"], "chance": task["chance"], "num_train": len(task["train"]),
          "num_validation": len(task["validation"])}

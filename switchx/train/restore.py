"""A trained model back from disk, for evaluation, decoding and fine-tuning.

    loaded = load_model("runs/pretrain")          # a `switchx train` / `switchx finetune` directory (newest
    loaded = load_model("runs/finetune/best")     # checkpoint), its best checkpoint, or a switchx.save /
    loaded.config, loaded.params, loaded.step     # transformers directory (switchx.load)

A run directory's checkpoint holds its whole TrainState, so restoring needs the state's abstract shapes and
shardings: they come from state.build on the given mesh (default: one device) with the optimizer the run used
(its TrainConfig, and its freezing option for fine-tuning runs). A config given for a checkpoint must describe
the same parameters: `apply_overrides` + `check_compatible` turn a mismatch into an error naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from switchx import data as data_lib
from switchx.config import DataConfig, DecoderOnlyConfig, ModelConfig, TrainConfig, config_from_dict
from switchx.data import sources
from switchx.interop.native import load
from switchx.parallel.mesh import MeshConfig, make_mesh
from switchx.parallel.partitioning import Partitioner
from switchx.train import optim, state as state_lib
from switchx.train.checkpoint import Checkpointer

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"   # fine-tuning runs keep a copy of the model's tokenizer here
# Fields that fix the parameters' shapes or what they compute: a checkpoint only fits a config that agrees.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers",
                       "num_decoder_layers", "activation", "relative_attention_num_buckets",
                       "relative_attention_max_distance", "logits_via_embedding", "layer_norm_epsilon",
                       "encoder_sparse", "decoder_sparse", "rescale_tied_logits", "position_embedding", "norm",
                       "use_bias", "scale_embeddings")
DECODER_ONLY_ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                    "d_ff", "activation", "tie_embeddings", "qk_norm", "qkv_bias", "sparse")
MOE_ARCHITECTURE_FIELDS = ("num_experts", "expert_d_ff", "route_by", "num_tasks")


def architecture_fields(config: ModelConfig | DecoderOnlyConfig) -> tuple[str, ...]:
  """The fields of `config`'s family that fix its parameters' shapes or what they compute."""
  return DECODER_ONLY_ARCHITECTURE_FIELDS if isinstance(config, DecoderOnlyConfig) else ARCHITECTURE_FIELDS


@dataclasses.dataclass
class LoadedModel:
  config: ModelConfig               # as saved with the checkpoint
  params: Any                       # restored onto the mesh (run directories) or numpy (saved models)
  record: dict                      # the run's config.json ({} for a saved model)
  step: int | None                  # checkpoint step (None for a saved model)
  source: str                       # what was read
  data_state: dict | None = None    # the training data's position at that checkpoint (run directories)
  opt_state: Any = None             # its optimizer state, where load_model(with_optimizer_state=True)

  @property
  def train_config(self) -> TrainConfig | None:
    return TrainConfig(**self.record["train"]) if "train" in self.record else None

  @property
  def data_config(self) -> DataConfig | None:
    return data_config_from(self.record["data"]) if "data" in self.record else None


def single_device_partitioner() -> Partitioner:
  return Partitioner(make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]))


def data_config_from(fields: dict) -> DataConfig:
  return DataConfig(**{**fields, "paths": tuple(fields.get("paths", ()))})


def model_config_from(fields: dict, source: str) -> ModelConfig:
  return config_from_dict(dict(fields), source)


def read_record(run_dir: str | Path) -> dict:
  """A run directory's config.json ({"model": ..., "train": ..., ...}); an error when it is not one."""
  path = Path(run_dir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE}; expected a directory written by `switchx train` / "
                            "`switchx finetune`, or by switchx.save.")
  record = json.loads(path.read_text())
  if "model" not in record:
    raise ValueError(f"{path} is not a run's config (no 'model' entry); for a switchx.save / transformers "
                     "directory use switchx.load.")
  return record


# --- a given config against the checkpoint's -----------------------------------------------------------------
def apply_overrides(saved: ModelConfig, model_changes: dict | None = None,
                    moe_changes: dict | None = None) -> ModelConfig:
  """The checkpoint's config with the given fields changed (e.g. gin bindings: dropout, capacity factors),
  checked to still describe the checkpoint's parameters."""
  model_changes = {k: v for k, v in (model_changes or {}).items() if k != "moe"}
  moe = dataclasses.replace(saved.moe, **(moe_changes or {}))
  given = saved.replace(**model_changes, moe=moe)
  check_compatible(saved, given)
  return given


def check_compatible(saved: ModelConfig, given: ModelConfig, source: str = "the checkpoint") -> None:
  """Raises a ValueError naming the first architecture field on which `given` differs from `saved`."""
  if type(saved) is not type(given):
    raise ValueError(f"{source} holds a {type(saved).__name__}, the config given is a {type(given).__name__}: "
                     "their parameters differ in kind. Use a preset of the checkpoint's family.")
  owner = type(saved).__name__
  checks = [(owner, name, getattr(saved, name), getattr(given, name)) for name in architecture_fields(saved)]
  if saved.is_sparse or given.is_sparse:
    checks += [("MoeConfig", name, getattr(saved.moe, name), getattr(given.moe, name))
               for name in MOE_ARCHITECTURE_FIELDS]
  for owner, name, was, now in checks:
    if was != now:
      raise ValueError(f"{owner}.{name}={now!r} does not match {source}, which was trained with {name}={was!r}; "
                       f"its parameters cannot be used with this config. Drop the {owner}.{name} binding (the "
                       "checkpoint's value is used by default) or start from a matching checkpoint.")


# --- restoring ---------------------------------------------------------------------------------------------
def run_optimizer(record: dict):
  """(transformation, schedule) whose state a run's checkpoints hold (fine-tuning runs: with their freezing)."""
  train_config = TrainConfig(**record["train"])
  if "finetune" in record:
    config = model_config_from(record["model"], "config.json")
    return optim.make_optimizer(train_config, record["finetune"].get("freeze", "none"), config)
  return optim.make_optimizer(train_config)


def build_run(config: ModelConfig, train_config: TrainConfig, partitioner: Partitioner,
              inputs_length: int | None = None, targets_length: int | None = None, optimizer=None):
  """state.build for `config` with a batch the partitioner splits (the batch only shapes tracing)."""
  rows = max(partitioner.num_batch_partitions, 1)
  train_config = dataclasses.replace(train_config, batch_size=rows, gradient_accumulation_steps=1)
  enc = np.zeros((rows, inputs_length or train_config.inputs_length), np.int32)
  dec = np.zeros((rows, targets_length or train_config.targets_length), np.int32)
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": dec,
           "encoder_task_ids": enc, "decoder_task_ids": dec}             # read by task-routed models only
  return state_lib.build(config, train_config, partitioner, batch, optimizer=optimizer)


def checkpoint_dir(path: Path) -> tuple[Path, Path]:
  """(run directory, checkpoint directory) for a run directory (its checkpoints/) or a run's best/."""
  if (path / CONFIG_FILE).is_file():
    return path, path / "checkpoints"
  if (path.parent / CONFIG_FILE).is_file():
    return path.parent, path
  raise FileNotFoundError(f"{path}: neither a run directory (with {CONFIG_FILE}) nor a checkpoint directory "
                          "inside one (e.g. RUN/best).")


def load_model(path: str | Path, partitioner: Partitioner | None = None,
               with_optimizer_state: bool = False) -> LoadedModel:
  """The model in `path`: a run directory (newest usable checkpoint of RUN/checkpoints, or of RUN/best when
  path is RUN/best), or a switchx.save / transformers directory. Checkpoints are restored onto
  `partitioner`'s mesh (default: one device)."""
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: no such directory.")
  config_fields = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
  if "model" not in config_fields and (path / CONFIG_FILE).is_file():
    config, params = load(str(path))
    return LoadedModel(config, params, {}, None, str(path))
  run_dir, ckpt_dir = checkpoint_dir(path)
  record = read_record(run_dir)
  config = model_config_from(record["model"], str(run_dir / CONFIG_FILE))
  if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise FileNotFoundError(f"{ckpt_dir}: no checkpoint to restore (was the run stopped before its first save?).")
  partitioner = partitioner or single_device_partitioner()
  train_config = TrainConfig(**record["train"])
  run = build_run(config, train_config, partitioner, optimizer=run_optimizer(record))
  abstract = run.abstract_state()
  checkpoints = Checkpointer(ckpt_dir, keep=max(train_config.keep_checkpoints, 1), async_save=False)
  try:
    state, meta, step = checkpoints.restore(abstract)
  finally:
    checkpoints.close()
  return LoadedModel(config, state.params, record, step, f"{ckpt_dir}/{step}", meta.get("data"),
                     state.opt_state if with_optimizer_state else None)


# --- the model's tokenizer -------------------------------------------------------------------------------
def load_tokenizer(path: str | Path, data_config: DataConfig | None = None):
  """The tokenizer a model was trained with: RUN/tokenizer.model (fine-tuning runs keep one) or spiece.model
  beside it (transformers), else for a `switchx train` run the one its DataConfig names or trained (rebuilt the
  same way: deterministic and cached), else data_config.tokenizer_path. Never a guess: an error otherwise."""
  path = Path(path)
  run_dir = path.parent if path.name == "best" and (path.parent / CONFIG_FILE).is_file() else path
  for name in (TOKENIZER_FILE, "spiece.model"):
    if (run_dir / name).is_file():
      return data_lib.Tokenizer.load(run_dir / name)
  record = json.loads((run_dir / CONFIG_FILE).read_text()) if (run_dir / CONFIG_FILE).is_file() else {}
  if "data" in record:  # runs recorded before DataConfig.split_seed split the documents by the training seed
    split_seed = record["data"].get("split_seed", TrainConfig(**record["train"]).seed)
    return tokenizer_for(data_config_from(record["data"]), split_seed)
  if data_config is not None and data_config.tokenizer_path:
    return data_lib.Tokenizer.load(data_config.tokenizer_path)
  raise ValueError(f"{path}: no tokenizer found ({TOKENIZER_FILE} or spiece.model beside the model, or a run "
                   "config naming one); set DataConfig.tokenizer_path to the model's SentencePiece file, e.g. "
                   "--gin.DataConfig.tokenizer_path=\"'/path/spiece.model'\".")


def tokenizer_for(data: DataConfig, seed: int | None = None):
  """The tokenizer `switchx train` built for a DataConfig (the same function builds it: data/sources.py)."""
  return sources.load_tokenizer(data, seed=seed)

"""Gin at the edge: configs/*.gin and `--gin.NAME=VALUE` flags -> the frozen config dataclasses.

Nothing inside the model reads gin. Gin files bind the dataclasses' fields by their class names (ModelConfig,
MoeConfig, TrainConfig, DataConfig, MeshConfig, DecodeConfig, TaskConfig, FinetuneConfig, and DecoderOnlyConfig
for the decoder-only presets):

    ModelConfig.d_model = 768
    MoeConfig.num_experts = 8          # ModelConfig.moe is always built from the MoeConfig bindings
    TrainConfig.learning_rate = 0.01

A --gin_file may be a path or a preset name ("switch_base_8", "models/switch_base_8", "runs/pretrain");
names resolve under the repository's configs/ folder. Unknown presets and unknown bindings fail with the closest
valid names suggested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import gin

from switchx.config import (DataConfig, DecodeConfig, DecoderOnlyConfig, FinetuneConfig, ModelConfig, MoeConfig,
                            TaskConfig, TrainConfig)
from switchx.parallel.mesh import MeshConfig

CONFIG_CLASSES = {cls.__name__: cls for cls in (ModelConfig, MoeConfig, TrainConfig, DataConfig, MeshConfig,
                                                DecodeConfig, TaskConfig, FinetuneConfig, DecoderOnlyConfig)}
_GIN = {name: gin.external_configurable(cls, name=name) for name, cls in CONFIG_CLASSES.items()}
CONFIG_ROOT = Path(os.environ.get("SWITCHX_CONFIGS", Path(__file__).resolve().parent.parent / "configs"))
CONFIG_FOLDERS = ("models", "runs", "experiments")


def register(cls) -> None:
  """Makes another frozen config dataclass bindable by its class name (e.g. the trainer's DataConfig)."""
  if cls.__name__ not in CONFIG_CLASSES:
    CONFIG_CLASSES[cls.__name__] = cls
    _GIN[cls.__name__] = gin.external_configurable(cls, name=cls.__name__)


def presets() -> list[str]:
  """Every gin file under configs/, as 'folder/name' (without .gin), in natural order (8 before 16)."""
  natural = lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
  return sorted((str(p.relative_to(CONFIG_ROOT).with_suffix("")) for p in CONFIG_ROOT.rglob("*.gin")),
                key=natural)


def resolve(name: str) -> Path:
  """A --gin_file value -> an existing file: a path, or a preset name looked up under configs/."""
  path = Path(name)
  if path.is_file():
    return path
  stem = name.removesuffix(".gin")
  candidates = [CONFIG_ROOT / f"{stem}.gin"] + [CONFIG_ROOT / folder / f"{stem}.gin" for folder in CONFIG_FOLDERS]
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  known = presets()
  close = difflib.get_close_matches(Path(stem).name, [Path(p).name for p in known], n=3, cutoff=0.5)
  hint = f" Did you mean {', '.join(close)}?" if close else ""
  raise ValueError(f"gin file or preset {name!r} not found (looked in {CONFIG_ROOT}).{hint} "
                   f"Known presets: {', '.join(known)}.")


def _check_binding_name(name: str) -> None:
  """'ModelConfig.d_model' -> nothing, or a ValueError with the closest valid names."""
  owner, _, field = name.rpartition(".")
  if owner not in CONFIG_CLASSES:
    close = difflib.get_close_matches(owner, list(CONFIG_CLASSES), n=3)
    hint = f" Did you mean {', '.join(c + '.' + field for c in close)}?" if close else ""
    raise ValueError(f"unknown gin binding {name!r}: no configurable named {owner!r}.{hint} "
                     f"Configurables: {', '.join(CONFIG_CLASSES)}.")
  fields = [f.name for f in dataclasses.fields(CONFIG_CLASSES[owner])]
  if owner in ("ModelConfig", "DecoderOnlyConfig"):
    fields.remove("moe")  # built from the MoeConfig bindings
  if field not in fields:
    close = difflib.get_close_matches(field, fields, n=3)
    hint = f" Did you mean {', '.join(owner + '.' + c for c in close)}?" if close else ""
    raise ValueError(f"unknown gin binding {name!r}: {owner} has no field {field!r}.{hint}")


def _binding_names(text: str) -> list[str]:
  """Left-hand sides of `A.b = ...` lines in gin text (macros and includes skipped)."""
  return re.findall(r"^\s*([A-Za-z_][\w]*\.[\w.]+)\s*=", text, flags=re.MULTILINE)


def parse(gin_files: Sequence[str] = (), bindings: Sequence[str] = ()) -> None:
  """Clears gin, then parses the files (in order) and the `NAME=VALUE` bindings (which win)."""
  paths = [resolve(f) for f in gin_files]
  for path in paths:
    for name in _binding_names(path.read_text()):
      try:
        _check_binding_name(name)
      except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
  for binding in bindings:
    if "=" not in binding:
      raise ValueError(f"gin binding {binding!r} must look like NAME=VALUE, e.g. MoeConfig.num_experts=16.")
    _check_binding_name(binding.split("=", 1)[0].strip())
  gin.clear_config()
  gin.add_config_file_search_path(str(CONFIG_ROOT))
  with _quiet_include_search():
    gin.parse_config_files_and_bindings([str(p) for p in paths], list(bindings), finalize_config=False)


@contextlib.contextmanager
def _quiet_include_search():
  """Gin logs an error for each include it first fails to find relative to the working directory, before it
  finds it on the search path; those lines are noise."""
  noise = lambda record: not record.getMessage().startswith("Path not found:")
  logging.getLogger().addFilter(noise)
  try:
    yield
  finally:
    logging.getLogger().removeFilter(noise)


def build(name: str, **overrides):
  """The named config dataclass with its gin bindings applied (ModelConfig gets its MoeConfig too)."""
  if name in ("ModelConfig", "DecoderOnlyConfig") and "moe" not in overrides:
    overrides["moe"] = _GIN["MoeConfig"]()
  return _GIN[name](**overrides)


def model_config() -> ModelConfig | DecoderOnlyConfig:
  """The model the bindings describe: a DecoderOnlyConfig where any of its fields is bound (the decoder-only
  presets, e.g. models/mixtral_8x7b), else the encoder-decoder's ModelConfig."""
  return build("DecoderOnlyConfig" if decoder_only_bound() else "ModelConfig")


def decoder_only_bound() -> bool:
  for field in dataclasses.fields(DecoderOnlyConfig):
    try:
      gin.query_parameter(f"DecoderOnlyConfig.{field.name}")
      return True
    except ValueError:
      continue
  return False


def train_config() -> TrainConfig:
  return build("TrainConfig")


def load(gin_files: Sequence[str] = (), bindings: Sequence[str] = ()) -> tuple[ModelConfig, TrainConfig]:
  parse(gin_files, bindings)
  return model_config(), train_config()


def data_config() -> DataConfig:
  return build("DataConfig")


def mesh_config() -> MeshConfig:
  return build("MeshConfig")


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """t5x-style flags: pulls `--gin.NAME=VALUE` out of argv -> (remaining argv, ['NAME=VALUE', ...])."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      bindings.append(arg[len("--gin."):])
    else:
      rest.append(arg)
  return rest, bindings


def operative_config() -> str:
  """The bindings in force (to save next to a run's outputs)."""
  return gin.config_str()

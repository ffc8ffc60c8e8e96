"""Checkpoint interop: transformers (hf.py) in and out, t5x / flaxformer (t5x.py) in, and `convert` for the CLI.

    from switchx.interop import import_hf, export_hf, import_t5x, convert

See docs/interop.md.
"""

from __future__ import annotations

from switchx.config import ModelConfig
from switchx.interop.hf import export_hf, import_hf
from switchx.interop.t5x import import_t5x

FROM_FORMATS = ("hf", "t5x", "switchx")
TO_FORMATS = ("switchx", "hf")

__all__ = ["convert", "export_hf", "import_hf", "import_t5x"]


def convert(src: str, dst: str, from_format: str, to_format: str,
            config_for_t5x: ModelConfig | str | None = None) -> ModelConfig:
  """Reads the checkpoint `src` ("hf": a transformers directory, "t5x": a t5x checkpoint directory, "switchx":
  a switchx.save directory) and writes it to `dst` as "switchx" (switchx.save) or "hf" (export_hf).
  A t5x checkpoint needs `config_for_t5x`: a ModelConfig or the path of a switchx config.json. Returns the
  model's config."""
  from switchx import api

  if from_format not in FROM_FORMATS:
    raise ValueError(f"convert: unknown source format {from_format!r}; choose one of {FROM_FORMATS}.")
  if to_format not in TO_FORMATS:
    raise ValueError(f"convert: unknown target format {to_format!r}; choose one of {TO_FORMATS}.")
  if from_format == "t5x":
    if config_for_t5x is None:
      raise ValueError("convert --from t5x needs the model config (t5x checkpoints hold none): pass a ModelConfig "
                       "or the path of a switchx config.json describing the architecture.")
    config = config_for_t5x
    if isinstance(config, str):
      import json

      with open(config) as f:
        config = api.config_from_dict(json.load(f), config)
    params = import_t5x(src, config)
  elif from_format == "hf":
    config, params = import_hf(src)
  else:
    config, params = api.load(src)
  if to_format == "hf":
    export_hf(config, params, dst)
  else:
    api.save(config, params, dst)
  return config

"""Save, load and run a model: the three calls most users need.

    switchx.save(config, params, "my_model/")
    config, params = switchx.load("my_model/")         # or a transformers T5 / SwitchTransformers directory
    logits = switchx.logits(config, params, encoder_input_tokens, decoder_input_tokens)   # [B, Ld, V]

The switchx format (a directory):
  config.json         {"switchx_format_version": 1, <every ModelConfig field>, "moe": {<every MoeConfig field>}};
                      sparse layouts are strings or lists of layer indices. Missing fields take the defaults.
  params.safetensors  float32 tensors named by their "/"-joined path in the parameter tree,
                      e.g. "encoder/layers_1/moe/experts/wi" (safetensors: no pickle, readable from numpy / torch).
A directory whose config.json has a "model_type" is read as a transformers checkpoint (interop.hf.import_hf).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from switchx.config import ModelConfig, MoeConfig, check_vocab
from switchx.interop.param_tree import check_params, flatten, unflatten

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"


def config_to_dict(config: ModelConfig) -> dict:
  """The JSON form of a config (the moe field nested)."""
  return {"switchx_format_version": FORMAT_VERSION, **dataclasses.asdict(config)}


def config_from_dict(fields: dict, source: str = "config") -> ModelConfig:
  """A ModelConfig from its JSON form; unknown fields are an error (written by a newer switchx?)."""
  fields = {k: v for k, v in fields.items() if k != "switchx_format_version"}
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  moe_known = {f.name for f in dataclasses.fields(MoeConfig)}
  moe = fields.pop("moe", {}) or {}
  unknown = sorted(set(fields) - known) + sorted(f"moe.{k}" for k in set(moe) - moe_known)
  if unknown:
    raise ValueError(f"{source}: unknown config fields {unknown}; was it written by a newer switchx? Remove them "
                     "or upgrade switchx.")
  for name in ("encoder_sparse", "decoder_sparse"):
    if isinstance(fields.get(name), list):
      fields[name] = tuple(fields[name])
  try:
    return ModelConfig(**fields, moe=MoeConfig(**moe))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source}: invalid config: {e}") from e


def save(config: ModelConfig, params, path: str) -> None:
  """Writes `path`/config.json and params.safetensors (the format in the module doc); the params must match
  the config (checked first, nothing written otherwise)."""
  import safetensors.numpy

  flat = {name: np.asarray(value) for name, value in flatten(params).items()}
  check_params(config, unflatten(flat), "switchx.save params")
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config_to_dict(config), f, indent=2)
  safetensors.numpy.save_file({name: np.ascontiguousarray(value) for name, value in flat.items()},
                              os.path.join(path, PARAMS_FILE), metadata={"format": "switchx"})


def load(path: str) -> tuple[ModelConfig, dict]:
  """(config, params) from a switchx.save directory or a transformers T5 / SwitchTransformers directory."""
  from switchx.interop import hf

  fields = hf.read_hf_config(path)  # checks the directory and config.json exist
  if "model_type" in fields:
    return hf.import_hf(path)
  version = fields.get("switchx_format_version")
  if version is None:
    raise ValueError(f"{path}/config.json is neither a switchx config (no switchx_format_version) nor a "
                     "transformers one (no model_type). For a t5x checkpoint use switchx.interop.import_t5x.")
  if version != FORMAT_VERSION:
    raise ValueError(f"{path}/config.json: switchx_format_version {version} is not supported (this switchx "
                     f"reads version {FORMAT_VERSION}); upgrade switchx.")
  config = config_from_dict(fields, f"{path}/config.json")
  params_path = os.path.join(path, PARAMS_FILE)
  if not os.path.isfile(params_path):
    raise FileNotFoundError(f"{path!r} has a switchx config.json but no {PARAMS_FILE}; was the save interrupted?")
  import safetensors.numpy

  params = unflatten(safetensors.numpy.load_file(params_path))
  check_params(config, params, params_path)
  return config, params


@functools.lru_cache(maxsize=16)
def _jitted_logits(config: ModelConfig):
  from switchx.models.encoder_decoder import EncoderDecoder

  model = EncoderDecoder(config)
  return jax.jit(lambda params, enc, dec: model.apply({"params": params}, enc, dec, train=False)[0])


def logits(config: ModelConfig, params, encoder_input_tokens, decoder_input_tokens) -> jax.Array:
  """Eval-mode output logits [B, Ld, V] float32 (jitted, one compile per config and shape). Token ids are
  [B, Le] / [B, Ld] integer arrays (numpy, jax or CPU torch); 0 is padding, decoder inputs start with 0."""
  tokens = []
  for name, value in (("encoder_input_tokens", encoder_input_tokens),
                      ("decoder_input_tokens", decoder_input_tokens)):
    value = np.asarray(value)
    if value.ndim != 2 or not np.issubdtype(value.dtype, np.integer):
      raise ValueError(f"{name}: expected a [batch, length] array of integer token ids, got shape {value.shape} "
                       f"and dtype {value.dtype}.")
    if value.size:
      check_vocab(config, int(value.max()), name)
    tokens.append(jnp.asarray(value, jnp.int32))
  if tokens[0].shape[0] != tokens[1].shape[0]:
    raise ValueError(f"encoder_input_tokens has {tokens[0].shape[0]} rows but decoder_input_tokens has "
                     f"{tokens[1].shape[0]}; they must describe the same batch.")
  return _jitted_logits(config)(params, *tokens)

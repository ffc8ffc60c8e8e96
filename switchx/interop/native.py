"""The switchx checkpoint format: a directory with config.json and params.safetensors. switchx.save / load.

  config.json         {"switchx_format_version": 1, <every ModelConfig field>, "moe": {<every MoeConfig field>}};
                      sparse layouts are strings or lists of layer indices. Missing fields take the defaults.
  params.safetensors  float32 tensors named by their "/"-joined path in the parameter tree,
                      e.g. "encoder/layers_1/moe/experts/wi" (safetensors: no pickle, readable from numpy / torch);
                      a quantized expert matrix (switchx/quantize.py) as "<path>.codes" and "<path>.scale", its
                      bits and shape in the file's metadata ("quantized").
A directory whose config.json has a "model_type" is read as a transformers checkpoint (interop.hf.import_hf; Mixtral,
OLMoE, Qwen-MoE: interop.hf_decoder.import_dir; NLLB-MoE: interop.hf_nllb.import_dir). A decoder-only model's config.json has "architecture": "decoder_only".
"""

from __future__ import annotations

import json
import os

import numpy as np
import safetensors
import safetensors.numpy

from switchx.config import FORMAT_VERSION, ModelConfig, config_from_dict, config_to_dict
from switchx.interop import hf_decoder, hf_nllb
from switchx.interop.hf import import_hf, read_hf_config
from switchx.interop.param_tree import check_params, flatten, unflatten
from switchx.quantize import Quantized, from_tensors, to_tensors

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"


def save(config: ModelConfig, params, path: str) -> None:
  """Writes `path`/config.json and params.safetensors (the format in the module doc); the params must match
  the config (checked first, nothing written otherwise)."""

  flat = {name: value if isinstance(value, Quantized) else np.asarray(value)
          for name, value in flatten(params).items()}
  check_params(config, unflatten(flat), "switchx.save params")
  tensors, quantized = to_tensors(flat)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config_to_dict(config), f, indent=2)
  safetensors.numpy.save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()},
                              os.path.join(path, PARAMS_FILE), metadata={"format": "switchx", **quantized})


def load(path: str) -> tuple[ModelConfig, dict]:
  """(config, params) from a switchx.save directory or a transformers T5 / SwitchTransformers directory."""

  fields = read_hf_config(path)  # checks the directory and config.json exist
  if fields.get("model_type") in hf_decoder.MODEL_TYPES:
    return hf_decoder.import_dir(path)
  if fields.get("model_type") == hf_nllb.MODEL_TYPE:
    return hf_nllb.import_dir(path)
  if "model_type" in fields:
    return import_hf(path)
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

  with safetensors.safe_open(params_path, framework="numpy") as f:
    metadata = f.metadata()
  params = unflatten(from_tensors(safetensors.numpy.load_file(params_path), metadata))
  check_params(config, params, params_path)
  return config, params

"""Save, load and run a model: the three calls most users need.

    switchx.save(config, params, "my_model/")
    config, params = switchx.load("my_model/")         # or a transformers T5 / SwitchTransformers directory
    logits = switchx.logits(config, params, encoder_input_tokens, decoder_input_tokens)   # [B, Ld, V]

    switchx.api.convert(src, dst, "hf", "switchx")   # `switchx convert`: hf / t5x / switchx -> switchx / hf

save and load live in interop/native.py (the switchx directory format, described there); this module is the
public face that gathers them with logits and convert.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from switchx.config import DecoderOnlyConfig, ModelConfig, check_vocab, config_from_dict, config_to_dict  # noqa: F401
from switchx.interop import hf_decoder, hf_nllb
from switchx.interop.hf import export_hf, import_hf  # noqa: F401 (re-exported)
from switchx.interop.native import CONFIG_FILE, PARAMS_FILE, load, save  # noqa: F401 (re-exported)
from switchx.interop.t5x import import_t5x
from switchx.models.encoder_decoder import EncoderDecoder
from switchx.quantize import dequantize


@functools.lru_cache(maxsize=16)
def _jitted_logits(config: ModelConfig):
  model = EncoderDecoder(config)
  return jax.jit(lambda params, enc, dec: model.apply({"params": dequantize(params)}, enc, dec, train=False)[0])


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


# --- converting between checkpoint formats (`switchx convert`) -------------------------------------------------
FROM_FORMATS = ("hf", "t5x", "switchx")
TO_FORMATS = ("switchx", "hf")


def convert(src: str, dst: str, from_format: str, to_format: str,
            config_for_t5x: ModelConfig | str | None = None) -> ModelConfig:
  """Reads the checkpoint `src` ("hf": a transformers directory, "t5x": a t5x checkpoint directory, "switchx":
  a switchx.save directory) and writes it to `dst` as "switchx" (switchx.save) or "hf" (export_hf).
  A t5x checkpoint needs `config_for_t5x`: a ModelConfig or the path of a switchx config.json. Returns the
  model's config."""
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
      with open(config) as f:
        config = config_from_dict(json.load(f), config)
    params = import_t5x(src, config)
  else:   # "hf" (transformers' T5 / SwitchTransformers / Mixtral directories) or "switchx"
    config, params = load(src)
  if to_format == "hf" and isinstance(config, DecoderOnlyConfig):
    hf_decoder.export_dir(config, params, dst)
  elif to_format == "hf" and config.position_embedding == "sinusoidal":   # NLLB-MoE's architecture
    hf_nllb.export_dir(config, params, dst)
  elif to_format == "hf":
    export_hf(config, params, dst)
  else:
    save(config, params, dst)
  return config

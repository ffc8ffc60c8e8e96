"""The parameter tree a ModelConfig implies, and the check every loader runs before it returns a tree.

Paths are "/"-joined names as in the unboxed flax tree, e.g. "encoder/layers_1/moe/experts/wi".
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from switchx.config import DecoderOnlyConfig, ModelConfig
from switchx.models.decoder_only import DecoderOnly
from switchx.models.encoder_decoder import EncoderDecoder

_SHOWN = 8  # names listed in an error before "... and N more"


@functools.lru_cache(maxsize=64)
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{path: shape} of every parameter of EncoderDecoder(config), from jax.eval_shape (no compute)."""

  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  if isinstance(config, DecoderOnlyConfig):
    abstract = jax.eval_shape(DecoderOnly(config).init, jax.random.PRNGKey(0), tokens)["params"]
  else:
    abstract = jax.eval_shape(EncoderDecoder(config).init, jax.random.PRNGKey(0), tokens, tokens)["params"]
  flat = flax.traverse_util.flatten_dict(nn.unbox(abstract), sep="/")
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def flatten(params) -> dict[str, np.ndarray]:
  """A nested parameter dict -> {"a/b/c": array}."""
  return flax.traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def listing(names, shown: int = _SHOWN) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - shown} more" if len(names) > shown else ""
  return ", ".join(names[:shown]) + more


def check_params(config: ModelConfig, params, source: str) -> None:
  """Raises a ValueError naming every missing, unexpected or mis-shaped parameter of `params` (nested dict)
  against what `config` implies; `source` says where the tree came from (a path)."""
  expected = expected_shapes(config)
  flat = flatten(params)
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  wrong = [f"{path} has shape {tuple(np.shape(flat[path]))}, the config implies {shape}"
           for path, shape in expected.items() if path in flat and tuple(np.shape(flat[path])) != shape]
  dtype = lambda v: v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype   # a Quantized leaf: float32
  wrong_dtype = [path for path in expected if path in flat and dtype(flat[path]) != np.float32]
  problems = []
  if missing:
    problems.append(f"missing parameters: {listing(missing)}")
  if unexpected:
    problems.append(f"unexpected parameters: {listing(unexpected)}")
  if wrong:
    problems.append("shape mismatches: " + "; ".join(wrong[:_SHOWN]))
  if wrong_dtype:
    problems.append(f"parameters that are not float32: {listing(wrong_dtype)}")
  if problems:
    raise ValueError(
        f"{source}: the parameters do not match the model config ({'; '.join(problems)}). The config must "
        "describe the checkpoint's architecture: check the layer counts, d_model, heads, d_ff, activation "
        "(gated or not), sparse layouts, num_experts and logits_via_embedding.")

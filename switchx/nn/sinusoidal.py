"""fairseq's fixed sinusoidal position embeddings (M2M100, NLLB-MoE), added to the token embeddings.

Row r of the table is [sin(r * w_0), ..., sin(r * w_{h-1}), cos(r * w_0), ..., cos(r * w_{h-1})] with h = D // 2
and w_i = 10000 ** (-i / (h - 1)) (a zero column appended when D is odd). fairseq numbers real tokens from
padding_idx + 1 = 2, so the token at position p (0-based within its sequence or packed segment) reads row p + 2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

FIRST_ROW = 2   # fairseq: padding_idx (1) + 1


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
  """positions [B|1, L] (0-based) -> [B|1, L, dim] float32."""
  half = dim // 2
  freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))   # [h]
  angle = (positions + FIRST_ROW).astype(jnp.float32)[..., None] * freq                    # [B, L, h]
  table = jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)                         # [B, L, 2h]
  if dim % 2:
    table = jnp.pad(table, [(0, 0)] * (table.ndim - 1) + [(0, 1)])
  return table

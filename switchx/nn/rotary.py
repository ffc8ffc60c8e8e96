"""Rotary position embeddings (RoPE, Su et al. 2021) in the half-split layout of GPT-NeoX, Llama and Mixtral: the
first and second halves of each head's features are the two coordinates of Dh / 2 planes, each rotated by the
token's position times its own frequency theta^(-2i / Dh)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """x [B, L, H, Dh] (Dh even), positions [B, L] (int) -> x rotated, same shape and dtype (computed in float32).
  A query at position p and a key at position p' rotated this way have a dot product that depends on p - p'
  only (tests/test_decoder_only.py)."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)   # [Dh/2]
  angles = positions[..., None].astype(jnp.float32) * inv_freq                            # [B, L, Dh/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]               # [B, L, 1, Dh/2]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)                                   # [B, L, H, Dh/2] each
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)

"""T5's layer norm: RMS normalisation with a learned scale, no bias, no mean subtraction."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchx.axes import EMBED


class RMSNorm(nn.Module):
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  axis_name: str = EMBED          # the logical axis of the normalised (last) dimension

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)  # statistics in float32 whatever the activation dtype
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * scale).astype(self.dtype)

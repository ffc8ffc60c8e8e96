"""Layer norms: T5's RMSNorm (learned scale, no bias, no mean subtraction) and LayerNorm (scale and bias, mean
subtracted: NLLB-MoE and fairseq's transformers). Statistics in float32 whatever the activation dtype."""

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


class LayerNorm(nn.Module):
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    param = lambda name, init: self.param(name, nn.with_logical_partitioning(init, (EMBED,)), (x.shape[-1],),
                                          jnp.float32)
    scale, bias = param("scale", nn.initializers.ones), param("bias", nn.initializers.zeros)
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * scale + bias).astype(self.dtype)


def make_norm(kind: str, epsilon: float, dtype, name: str) -> nn.Module:
  """ModelConfig.norm -> the module: "rms" (RMSNorm) or "layer" (LayerNorm)."""
  return (LayerNorm if kind == "layer" else RMSNorm)(epsilon, dtype, name=name)

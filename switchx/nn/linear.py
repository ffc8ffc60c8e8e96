"""Linear maps and embeddings with T5 initialisation, logical axes and the dtype policy.

Dtype policy: parameters are stored in float32; a matmul casts its operands to the activation dtype and
accumulates in float32 (`preferred_element_type`), then casts the result back. With bfloat16 activations this
keeps accumulation exact-ish everywhere and lets CPUs use their bf16 matrix units.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def matmul(equation: str, a: jax.Array, b: jax.Array, dtype: Dtype, out_dtype: Dtype | None = None) -> jax.Array:
  """einsum with operands in `dtype`, float32 accumulation, result in `out_dtype` (default: `dtype`)."""
  out = jnp.einsum(equation, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
  return out.astype(dtype if out_dtype is None else out_dtype)


def t5_kernel_init(scale: float, num_in: int, num_out: int, num_batch: int = 0) -> nn.initializers.Initializer:
  """Truncated normal with std = sqrt(scale / fan_in); fan_in is the product of the contracted dims."""
  batch = tuple(range(num_batch))
  in_axes = tuple(range(num_batch, num_batch + num_in))
  out_axes = tuple(range(num_batch + num_in, num_batch + num_in + num_out))
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                          in_axis=in_axes, out_axis=out_axes, batch_axis=batch)


class DenseGeneral(nn.Module):
  """y = x @ kernel, contracting the last `num_contract` dims of x; no bias (T5 has none)."""

  features: int | Sequence[int]
  kernel_axes: tuple[str, ...]
  num_contract: int = 1
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  out_dtype: Dtype | None = None   # default: dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[x.ndim - self.num_contract:]
    init = t5_kernel_init(self.init_scale, self.num_contract, len(features))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        in_shape + features, jnp.float32)
    letters = "abcdefghijklmnopqrstuvwxyz"
    batch = letters[: x.ndim - self.num_contract]
    contract = letters[len(batch): len(batch) + self.num_contract]
    out = letters[len(batch) + self.num_contract: len(batch) + self.num_contract + len(features)]
    return matmul(f"{batch}{contract},{contract}{out}->{batch}{out}", x, kernel, self.dtype, self.out_dtype)


class Embed(nn.Module):
  """Token embedding [V, D], shared by encoder and decoder; `attend` gives tied output logits."""

  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)  # [B, L, D]

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output logits [B, L, V], in float32."""
    return matmul("bld,vd->blv", x, self.embedding, self.dtype, jnp.float32)

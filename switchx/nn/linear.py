"""Linear maps and embeddings with T5 initialisation, logical axes and the dtype policy.

Dtype policy: parameters are stored in float32; a matmul casts its operands to the activation dtype and
accumulates in float32 (`preferred_element_type`), then casts the result back. With bfloat16 activations this
keeps accumulation exact-ish everywhere and lets CPUs use their bf16 matrix units.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchx.axes import EMBED, VOCAB

Dtype = Any


def matmul(equation: str, a: jax.Array, b: jax.Array, dtype: Dtype, out_dtype: Dtype | None = None) -> jax.Array:
  """einsum with operands in `dtype`, float32 accumulation, result in `out_dtype` (default: `dtype`). With
  low-precision operands (bfloat16) the backward products take them in that precision too (_low_precision_matmul)."""
  a, b = a.astype(dtype), b.astype(dtype)
  out_dtype = dtype if out_dtype is None else out_dtype
  if jnp.dtype(dtype).itemsize < 4:
    return _low_precision_matmul(equation, a, b).astype(out_dtype)
  return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_matmul(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """The float32 product of low-precision operands, differentiated in their precision: the float32 cotangent is
  rounded to the operands' dtype, so both backward products run bf16 x bf16 -> f32 like the forward. Autodiff
  would upcast the other operand and run them f32 x f32, which on a CPU with bf16 matrix units misses them.
  - Result cast to the operands' dtype (every layer's matmul): the rounding is exact, since the cotangent of a
    bfloat16 result holds bfloat16 values; the gradients are autodiff's up to the order of float32 summation.
  - Result kept in float32 (the tied logits): the cotangent is rounded as if the result had been made in
    bfloat16 and cast, as t5x's bfloat16 logits are.
  Speed-ups measured: benchmarks/README.md ("Why the code is shaped this way").
  Needs a plain contraction: every operand index also appears in the other operand or the result."""
  return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)


def _low_precision_matmul_fwd(equation, a, b):
  return _low_precision_matmul(equation, a, b), (a, b)


def _low_precision_matmul_bwd(equation, residuals, ct):
  a, b = residuals
  inputs, out = equation.split("->")
  x, y = inputs.split(",")
  if not set(x) <= set(y) | set(out) or not set(y) <= set(x) | set(out):
    raise ValueError(f"matmul {equation!r}: an operand index is summed away alone; not a plain contraction.")
  ct = ct.astype(a.dtype)
  da = jnp.einsum(f"{out},{y}->{x}", ct, b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f"{out},{x}->{y}", ct, a, preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def t5_kernel_init(scale: float, num_in: int, num_out: int, num_batch: int = 0) -> nn.initializers.Initializer:
  """Truncated normal with std = sqrt(scale / fan_in); fan_in is the product of the contracted dims."""
  batch = tuple(range(num_batch))
  in_axes = tuple(range(num_batch, num_batch + num_in))
  out_axes = tuple(range(num_batch + num_in, num_batch + num_in + num_out))
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                          in_axis=in_axes, out_axis=out_axes, batch_axis=batch)


class DenseGeneral(nn.Module):
  """y = x @ kernel, contracting the last `num_contract` dims of x; no bias (T5 has none) unless use_bias
  (Qwen's query / key / value projections): a float32 "bias" of the output's shape, zeros at first."""

  features: int | Sequence[int]
  kernel_axes: tuple[str, ...]
  num_contract: int = 1
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  out_dtype: Dtype | None = None   # default: dtype
  use_bias: bool = False

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
    y = matmul(f"{batch}{contract},{contract}{out}->{batch}{out}", x, kernel, self.dtype, self.out_dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.kernel_axes[self.num_contract:]),
                        features, jnp.float32)
      y = (y.astype(jnp.float32) + bias).astype(y.dtype)
    return y


class Embed(nn.Module):
  """Token embedding [V, D], shared by encoder and decoder; `attend` gives tied output logits."""

  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  stddev: float = 1.0             # T5: 1; fairseq / NLLB (embeddings x sqrt(D)): D ** -0.5

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=self.stddev), (VOCAB, EMBED)),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)  # [B, L, D]

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output logits [B, L, V], in float32. Serving parameters (decode.serving_params) may carry the table
    transposed beside it, `logits_kernel` [D, V] in the model's dtype: the same product, but XLA's CPU backend
    no longer writes a transposed copy of the table in every call to put it in its dot's layout."""
    if self.has_variable("params", "logits_kernel"):
      kernel = self.get_variable("params", "logits_kernel")                  # [D, V]
      return matmul("bld,dv->blv", x, kernel, self.dtype, jnp.float32)
    return matmul("bld,vd->blv", x, self.embedding, self.dtype, jnp.float32)

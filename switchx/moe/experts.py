"""The experts: E independent feed-forward networks applied expert-major, their matmul and their dtype policy.

    x [E, G, C, D] -> [E, G*C, D] -> wi [E, D, F] (+ bias) -> act -> dropout -> wo [E, F, D] (+ bias) -> [E, G, C, D]
    dropless blocks: x [N, 1, b, D], block n through expert block_expert[n]'s weights (gathered: [N, D, F])
    ragged: x [P, 1, M, D], each shard's rows sorted by expert, jax.lax.ragged_dot with group_sizes [P, E]

Weights are float32; products run in `expert_compute_dtype` (float32 accumulation); activations enter and leave
in the model's dtype. The measurements behind both: benchmarks/README.md ("Why the code is shaped this way").
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchx.axes import EMBED, EXPERT, EXPERT_MLP, UNMODELED
from switchx.nn.linear import matmul, t5_kernel_init
from switchx.nn.mlp import activation_fn

# Up to this many tokens per expert (G * C), expert_matmul fixes its dots' layouts; above it, plain autodiff.
FIXED_LAYOUT_MAX_TOKENS = 128
# On XLA's CPU backend, "auto" expert dtype trains the experts in bfloat16 only from this many tokens per expert.
BF16_MIN_TOKENS = 128


def expert_compute_dtype(setting: str, model_dtype, tokens_per_expert: int, train: bool) -> jnp.dtype:
  """The dtype the expert FFN computes in (MoeConfig.expert_dtype). "auto" is the model's dtype, except when
  training on XLA's CPU backend with fewer than BF16_MIN_TOKENS tokens per expert, where it is float32: there a
  batched bfloat16 dot with one weight matrix per expert and few tokens misses the CPU's matrix units and runs
  slower than float32 (and adds a cast of every expert weight). Decoding keeps the model's dtype (the cast is
  hoisted out of the decoding loop)."""
  if setting != "auto":
    return jnp.dtype(setting)
  if train and jax.default_backend() == "cpu" and tokens_per_expert < BF16_MIN_TOKENS:
    return jnp.dtype(jnp.float32)
  return jnp.dtype(model_dtype)


def expert_matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """Per-expert matmul [E, T, I] x [E, I, O] -> [E, T, O] in `dtype` (operands cast, float32 accumulation).

  The product einsum('eti,eio->eto'). With few tokens per expert (T <= FIXED_LAYOUT_MAX_TOKENS, the usual case
  with many experts) it runs with a hand-written backward that fixes every dot's memory layout (the weight
  contracted along its contiguous axis, outputs tokens-last; optimization barriers keep the transposes from
  being folded back), which XLA's CPU backend runs several times faster than autodiff's layouts. Outside
  differentiation it is the plain einsum. Equal to the einsum up to float32 summation order; dw comes back in
  w's dtype, accumulated in float32.
  """
  if x.shape[1] > FIXED_LAYOUT_MAX_TOKENS:
    return matmul("eti,eio->eto", x, w, dtype)
  return _expert_matmul(x.astype(dtype), w, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _expert_matmul(x, w, dtype):
  return matmul("eti,eio->eto", x, w, dtype)          # not differentiated: the plain product


def _expert_matmul_fwd(x, w, dtype):
  y = jnp.einsum("eti,eio->eto", x, w.astype(dtype), preferred_element_type=jnp.float32)  # [E, T, O]
  xt = jax.lax.optimization_barrier(jnp.swapaxes(x, 1, 2))                        # [E, I, T], for dw
  return y.astype(dtype), (xt, w)


def _expert_matmul_bwd(dtype, residuals, dy):
  xt, w = residuals                                                               # [E, I, T], [E, I, O]
  dy = dy.astype(dtype)                                                           # [E, T, O]
  dxt = jnp.einsum("eio,eto->eit", w.astype(dtype), dy, preferred_element_type=jnp.float32)  # [E, I, T]
  dx = jnp.swapaxes(jax.lax.optimization_barrier(dxt), 1, 2).astype(dtype)        # [E, T, I]
  dw = jnp.einsum("eit,eto->eio", xt, dy, preferred_element_type=jnp.float32)     # [E, I, O]
  return dx, dw.astype(w.dtype)


_expert_matmul.defvjp(_expert_matmul_fwd, _expert_matmul_bwd)


class Experts(nn.Module):
  """E independent feed-forward networks applied expert-major: [E, G, C, D] -> [E, G, C, D]."""

  num_experts: int
  d_ff: int
  activation: str
  dropout_rate: float
  init_scale: float
  dtype: jnp.dtype = jnp.float32          # the model's activation dtype
  expert_dtype: str = "auto"              # MoeConfig.expert_dtype, resolved by expert_compute_dtype
  use_bias: bool = False                  # per-expert biases wi_bias [E, F] / wo_bias [E, D] (NLLB-MoE)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, block_expert: jax.Array | None = None,
               group_sizes: jax.Array | None = None) -> jax.Array:
    """x [E, G, C, D] -> [E, G, C, D]; with block_expert [N] (dropless), x [N, 1, b, D] -> [N, 1, b, D]:
    block n goes through expert block_expert[n]; with group_sizes [P, E] (ragged), x [P, 1, M, D] -> the same:
    shard p's rows run expert by expert, group_sizes[p, e] of them for expert e (jax.lax.ragged_dot)."""
    rows, num_groups, capacity, d_model = x.shape
    in_dtype = x.dtype
    per_expert = num_groups * capacity if group_sizes is None else capacity // self.num_experts
    dtype = expert_compute_dtype(self.expert_dtype, self.dtype, per_expert, train=not deterministic)
    act, gated = activation_fn(self.activation)
    init = t5_kernel_init(self.init_scale, num_in=1, num_out=1, num_batch=1)  # fan_in per expert

    def kernel(name, shape, axes, initializer=init):
      w = self.param(name, nn.with_logical_partitioning(initializer, axes), shape, jnp.float32)
      return w if block_expert is None else jnp.take(w, block_expert, axis=0)  # [N, ...]: one per block

    def add_bias(h, name, features, axis):                                     # h [E|N, T, features]
      if not self.use_bias:
        return h
      b = kernel(name, (self.num_experts, features), (EXPERT, axis), nn.initializers.zeros)  # [E|N, features]
      return (h.astype(jnp.float32) + b[:, None, :]).astype(h.dtype)

    if group_sizes is not None:
      return self._ragged(x, kernel, group_sizes, dtype, deterministic).astype(in_dtype)

    wi_shape, wi_axes = (self.num_experts, d_model, self.d_ff), (EXPERT, EMBED, EXPERT_MLP)
    x = x.reshape(rows, num_groups * capacity, d_model)                        # [E, G*C, D]
    if gated:
      h = act(add_bias(expert_matmul(x, kernel("wi_0", wi_shape, wi_axes), dtype), "wi_0_bias", self.d_ff, EXPERT_MLP))
      h = h * add_bias(expert_matmul(x, kernel("wi_1", wi_shape, wi_axes), dtype), "wi_1_bias", self.d_ff, EXPERT_MLP)
    else:
      h = act(add_bias(expert_matmul(x, kernel("wi", wi_shape, wi_axes), dtype), "wi_bias", self.d_ff,
                       EXPERT_MLP))                                            # [E, G*C, F]
    if block_expert is None:
      h = nn.with_logical_constraint(h, (EXPERT, UNMODELED, EXPERT_MLP))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)          # expert dropout
    wo = kernel("wo", (self.num_experts, self.d_ff, d_model), (EXPERT, EXPERT_MLP, EMBED))
    out = add_bias(expert_matmul(h, wo, dtype), "wo_bias", d_model, EMBED)     # [E, G*C, D]
    return out.reshape(rows, num_groups, capacity, d_model).astype(in_dtype)

  def _ragged(self, x, kernel, group_sizes, dtype, deterministic):
    """x [P, 1, M, D]: each shard's rows sorted by expert -> [P, 1, M, D], by grouped matmuls (float32
    accumulation); rows past the shard's routed choices come out zero."""
    act, gated = activation_fn(self.activation)
    d_model = x.shape[-1]
    rows = x[:, 0].astype(dtype)                                              # [P, M, D]
    # Each row's expert (biases only): rows before the end of expert e's run and after e - 1's belong to e.
    ends = jnp.cumsum(group_sizes, axis=-1)                                   # [P, E]
    row_expert = (jnp.arange(rows.shape[1])[None, :, None] >= ends[:, None, :]).sum(-1)   # [P, M]
    row_expert = jnp.minimum(row_expert, self.num_experts - 1)                # rows past the choices: unused

    def grouped(lhs, w, bias_name=None):                                      # [P, M, I] x [E, I, O] -> [P, M, O]
      w = w.astype(dtype)                # a loop over the P shards: ragged_dot's transpose does not vmap
      out = jnp.stack([jax.lax.ragged_dot(lhs[p], w, group_sizes[p], preferred_element_type=jnp.float32)
                       for p in range(lhs.shape[0])])
      if self.use_bias and bias_name:
        b = kernel(bias_name, (self.num_experts, w.shape[-1]),
                   (EXPERT, EMBED if bias_name == "wo_bias" else EXPERT_MLP), nn.initializers.zeros)  # [E, O]
        out = out + jnp.take(b, row_expert, axis=0)                           # [P, M, O]
      return out

    wi_shape, wi_axes = (self.num_experts, d_model, self.d_ff), (EXPERT, EMBED, EXPERT_MLP)
    if gated:
      h = act(grouped(rows, kernel("wi_0", wi_shape, wi_axes), "wi_0_bias"))
      h = h * grouped(rows, kernel("wi_1", wi_shape, wi_axes), "wi_1_bias")
    else:
      h = act(grouped(rows, kernel("wi", wi_shape, wi_axes), "wi_bias"))     # [P, M, F] float32
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic).astype(dtype)
    wo = kernel("wo", (self.num_experts, self.d_ff, d_model), (EXPERT, EXPERT_MLP, EMBED))
    return grouped(h, wo, "wo_bias")[:, None]                                 # [P, 1, M, D]

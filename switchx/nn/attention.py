"""T5 attention: masks, relative position bias and multi-head attention (no 1/sqrt(d_head) scaling: a converted
model that scales, as NLLB-MoE, carries the factor in its query projection); and the
grouped-query attention with rotary positions of decoder-only models.

Legend: B batch, Q query length, K key length, H heads, Dh head dim, D d_model.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switchx.axes import BATCH, EMBED, HEADS, KV, LENGTH, RELPOS, UNMODELED
from switchx.nn.linear import DenseGeneral, matmul
from switchx.nn.norm import RMSNorm
from switchx.nn.rotary import rotary

# Added to masked attention logits. Finite, so a fully masked row (a padding query) gives a uniform softmax
# instead of NaN; real queries always have at least one visible key.
MASK_VALUE = -1e10


# --- masks ------------------------------------------------------------------------------------------------
def attention_mask(q_valid: jax.Array, k_valid: jax.Array, q_segments: jax.Array | None = None,
                   k_segments: jax.Array | None = None, causal: bool = False) -> jax.Array:
  """Boolean mask [B, 1, Q, K]: a query sees a key when both are real tokens, in the same packed segment,
  and (causal) the key is not in the future. Valid and segment arrays are [B, Q] / [B, K]."""
  mask = q_valid[:, :, None] & k_valid[:, None, :]                          # [B, Q, K]
  if q_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  if causal:
    q_len, k_len = q_valid.shape[1], k_valid.shape[1]
    mask &= jnp.tril(jnp.ones((q_len, k_len), bool), k=k_len - q_len)[None]
  return mask[:, None]                                                      # [B, 1, Q, K]


def mask_to_bias(mask: jax.Array) -> jax.Array:
  return jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)


# --- relative position bias -------------------------------------------------------------------------------
def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
  """T5's bucketing of relative_position = key_position - query_position.

  Bidirectional: half the buckets for keys before the query, half for keys after. Within a half, the first
  half of its buckets are exact distances 0..n/2-1, the rest log-spaced up to max_distance (beyond: last bucket).
  Causal: keys after the query all fall into bucket 0 (they are masked anyway).
  """
  xp = jnp if isinstance(relative_position, jax.Array) else np
  distance = -relative_position                     # > 0 when the key precedes the query
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    bucket = (distance < 0).astype(np.int32) * num_buckets
    distance = xp.abs(distance)
  else:
    distance = xp.maximum(distance, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  log_ratio = xp.log(xp.maximum(distance, 1).astype(np.float32) / max_exact) / np.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(np.int32)
  large = xp.minimum(large, num_buckets - 1)
  return bucket + xp.where(is_small, distance, large).astype(np.int32)


class RelativePositionBias(nn.Module):
  """A learned scalar per (bucket, head), computed once per stack and shared by its layers."""

  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool

  @nn.compact
  def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """Positions [B|1, Q] and [B|1, K] -> bias [B|1, H, Q, K] (float32)."""
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                                     (HEADS, RELPOS)),
        (self.num_heads, self.num_buckets), jnp.float32)                     # [H, buckets]
    relative = k_positions[:, None, :] - q_positions[:, :, None]            # [B, Q, K]
    buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
    bias = jnp.take(table, buckets, axis=1)                                  # [H, B, Q, K]
    return jnp.transpose(bias, (1, 0, 2, 3))                                 # [B, H, Q, K]


# --- attention --------------------------------------------------------------------------------------------
KV_CACHE_MODES = (None, "self", "cross")


def self_cache_dtype(dtype) -> jnp.dtype:
  """The dtype decoding's self-attention cache stores keys and values in: float32 on XLA's CPU backend, else
  the model's. The values are the same (keys and values are computed in the model's dtype, which float32
  holds exactly). A bfloat16 cache on the CPU made XLA convert the whole cache to float32 and back around each
  step's one-slot update (not done in place), and to float32 again for the attention products, which it
  runs in float32 (identical logits; the speed-up: benchmarks/README.md)."""
  return jnp.dtype(jnp.float32) if jax.default_backend() == "cpu" else jnp.dtype(dtype)


class MultiHeadAttention(nn.Module):
  """T5 multi-head attention, optionally over a key/value cache (the flax 'cache' collection) for decoding.

  kv_cache=None: ordinary attention (training, scoring). kv_cache="self": decoder self-attention one token at a
  time; the cache holds cached_key / cached_value [B, H, Dh, L_max] and cache_index (slots filled), each call
  writes the new token's key and value at cache_index and attends over all L_max slots (the caller's bias masks
  the empty ones). kv_cache="cross": the keys and values of inputs_kv (the encoder output) are projected on the
  first call and read back afterwards, so each step costs nothing in the encoder length but the dot products.
  A call that finds no cache yet (apply with mutable=["cache"]) creates it, sized by its inputs, and otherwise
  computes ordinary attention.
  """

  num_heads: int
  head_dim: int
  dropout_rate: float
  init_scale: float
  dtype: Any = jnp.float32
  use_bias: bool = False          # biases on the four projections (NLLB-MoE; T5: none)

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, bias: jax.Array,
               deterministic: bool, kv_cache: str | None = None) -> jax.Array:
    """inputs_q [B, Q, D], inputs_kv [B, K, D], bias [B|1, H|1, Q, K] (mask + position) -> [B, Q, D].

    With a self-attention cache in use, Q = 1 and bias covers the cache: [B|1, H|1, 1, L_max]."""
    if kv_cache not in KV_CACHE_MODES:
      raise ValueError(f"kv_cache={kv_cache!r}: choose one of {KV_CACHE_MODES}.")
    d_model = inputs_q.shape[-1]
    proj = lambda name, scale: DenseGeneral((self.num_heads, self.head_dim), (EMBED, HEADS, KV),
                                            init_scale=scale, dtype=self.dtype, use_bias=self.use_bias, name=name)
    # T5 does not scale logits by 1/sqrt(head_dim); the query initialisation carries that factor instead.
    q = proj("query", self.init_scale / self.head_dim)(inputs_q)             # [B, Q, H, Dh]
    k = proj("key", self.init_scale)(inputs_kv)                              # [B, K, H, Dh]
    v = proj("value", self.init_scale)(inputs_kv)                            # [B, K, H, Dh]
    q = nn.with_logical_constraint(q, (BATCH, LENGTH, HEADS, KV))
    # Keys and values head-major, [B, H, Dh, K]: the layout XLA's CPU dots read them in. A decoding cache kept
    # in this layout is read as it is, instead of being transposed (a full copy of the cache) at every step.
    k = nn.with_logical_constraint(jnp.einsum("bkhd->bhdk", k), (BATCH, HEADS, KV, LENGTH))
    v = nn.with_logical_constraint(jnp.einsum("bkhd->bhdk", v), (BATCH, HEADS, KV, LENGTH))
    if kv_cache == "self":
      k, v = self._self_cache(k, v)
    elif kv_cache == "cross":
      k, v = self._cross_cache(k, v)

    # Keys and values in their own dtype (a float32 decoding cache holds exactly the model dtype's values).
    logits = jnp.einsum("bqhd,bhdk->bhqk", q, k, preferred_element_type=jnp.float32)  # [B, H, Q, K]
    weights = jax.nn.softmax(logits + bias, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
    if v.dtype == weights.dtype:  # training: matmul's backward keeps bfloat16 operands
      out = matmul("bhqk,bhdk->bqhd", weights, v, self.dtype)                  # [B, Q, H, Dh]
    else:                         # a float32 decoding cache under a bfloat16 model: read as it is
      out = jnp.einsum("bhqk,bhdk->bqhd", weights, v, preferred_element_type=jnp.float32)  # [B, Q, H, Dh]
    out = out.astype(self.dtype)
    out = DenseGeneral(d_model, (HEADS, KV, EMBED), num_contract=2, init_scale=self.init_scale,
                       dtype=self.dtype, use_bias=self.use_bias, name="out")(out)  # [B, Q, D]
    return nn.with_logical_constraint(out, (BATCH, LENGTH, EMBED))

  def _self_cache(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes this step's key / value [B, H, Dh, 1] at cache_index -> the whole cache [B, H, Dh, L_max] each.
    On the call that creates the cache (k, v [B, H, Dh, L_max]) it stays empty and k, v pass through."""
    filled = self.has_variable("cache", "cached_key")
    dtype = self_cache_dtype(k.dtype)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not filled:
      return k, v
    batch, heads, head_dim, steps = k.shape
    if steps != 1 or cached_key.value.shape != (batch, heads, head_dim, cached_key.value.shape[-1]):
      raise ValueError(f"a cached decoding step takes one token per row: got keys {k.shape} for a cache of "
                       f"{cached_key.value.shape} ([B, H, Dh, L_max]).")
    index = cache_index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k.astype(dtype), (0, 0, 0, index))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v.astype(dtype), (0, 0, 0, index))
    cache_index.value = index + 1
    return cached_key.value, cached_value.value

  def _cross_cache(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The encoder-side keys / values, projected once: stored on the first call, read back afterwards (the
    projections of this call are then unused, and jit drops them)."""
    cached_key = self.variable("cache", "cached_key", lambda: k)
    cached_value = self.variable("cache", "cached_value", lambda: v)
    return cached_key.value, cached_value.value


class GroupedQueryAttention(nn.Module):
  """Causal self-attention of decoder-only models (Llama, Mixtral, OLMoE, Qwen): rotary positions on queries and
  keys, logits scaled by 1 / sqrt(head_dim), and num_kv_heads key/value heads each shared by a group of
  num_heads / num_kv_heads query heads (query head h reads key/value head h // group; = num_heads: ordinary
  multi-head attention, 1: multi-query). Parameters: query [D, H, Dh], key and value [D, Hkv, Dh], out [H, Dh, D]."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  dropout_rate: float = 0.0
  init_scale: float = 1.0
  dtype: Any = jnp.float32
  qk_norm: str = "none"            # RMSNorm on queries and keys before the rotation: "head" (each head's Dh,
                                   # one scale shared by the heads: Qwen3) or "full" (all H x Dh: OLMoE)
  qkv_bias: bool = False           # biases on the query / key / value projections (Qwen1.5 / Qwen2)
  norm_epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, bias: jax.Array, deterministic: bool,
               decode: bool = False) -> jax.Array:
    """x [B, L, D], positions [B, L], bias [B|1, 1, L, K] (mask: causal, padding, segments) -> [B, L, D].

    decode: keys and values go through the 'cache' collection (apply with mutable=["cache"]): a call that finds
    no cache creates an empty one sized by x ([B, L_max]) and attends as usual (K = L); later calls write their
    L new keys / values at cache_index (then advanced by L) and attend over all K = L_max slots, the caller's bias
    masking the slots not yet written or in the future."""
    batch, length, d_model = x.shape
    heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
    proj = lambda name, n: DenseGeneral((n, head_dim), (EMBED, HEADS, KV), init_scale=self.init_scale,
                                        dtype=self.dtype, use_bias=self.qkv_bias, name=name)
    q = self._norm("query_norm", proj("query", heads)(x))                     # [B, L, H, Dh]
    k = self._norm("key_norm", proj("key", kv_heads)(x))                       # [B, L, Hkv, Dh]
    q, k = rotary(q, positions, self.rope_theta), rotary(k, positions, self.rope_theta)
    v = proj("value", kv_heads)(x)                                             # [B, L, Hkv, Dh]
    if decode:
      k, v = self._cache(k, v)                                                 # [B, K, Hkv, Dh]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)        # [B, L, Hkv, G, Dh]
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)  # [B, Hkv, G, Q, K]
    logits = logits * head_dim ** -0.5 + bias[:, :, None]
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
    out = matmul("bhgqk,bkhd->bqhgd", weights, v, self.dtype)                   # [B, L, Hkv, G, Dh]
    out = out.reshape(batch, length, heads, head_dim)
    out = DenseGeneral(d_model, (HEADS, KV, EMBED), num_contract=2, init_scale=self.init_scale,
                       dtype=self.dtype, name="out")(out)                       # [B, L, D]
    return nn.with_logical_constraint(out, (BATCH, LENGTH, EMBED))

  def _cache(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    filled = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not filled:
      return k, v
    start = index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype),
                                                    (0, start, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype),
                                                      (0, start, 0, 0))
    index.value = start + k.shape[1]
    return cached_key.value, cached_value.value

  def _norm(self, name: str, x: jax.Array) -> jax.Array:
    """x [B, L, n, Dh] -> the same, RMS-normalised over Dh ("head") or over n x Dh ("full"), or unchanged."""
    if self.qk_norm == "head":
      return RMSNorm(self.norm_epsilon, self.dtype, KV, name=name)(x)
    if self.qk_norm == "full":
      flat = RMSNorm(self.norm_epsilon, self.dtype, UNMODELED, name=name)(x.reshape(x.shape[:2] + (-1,)))
      return flat.reshape(x.shape)
    return x

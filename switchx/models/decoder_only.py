"""A decoder-only MoE language model (Mixtral, OLMoE, Qwen-MoE): the same MoE layer as the encoder-decoder.

Legend: B batch, L length, D d_model, V vocabulary.

    tokens [B, L] -> token_embedder -> x [B, L, D]
    per layer i:  x += GroupedQueryAttention(RMSNorm(x))        rotary positions, causal + padding + segment mask
                  x += FFN_i(RMSNorm(x))                        MlpBlock, or MoeLayer where config.sparse says
    logits [B, L, V] float32 = final_norm(x) @ logits_dense      (or the embedding, tie_embeddings)

Token id 0 is padding (never attended to, never routed), as everywhere in switchx. With packed rows, `segment_ids`
[B, L] (0: padding) keep sequences apart and `positions` [B, L] restart at 0 for each; without them every nonzero
token is real and positions count from 0. Returns (logits, moe_aux {"decoder/layers_i": that layer's
losses/metrics}, named as the encoder-decoder's decoder layers, so the trainer's metrics read them alike).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchx.axes import BATCH, EMBED, LENGTH, VOCAB
from switchx.config import DecoderOnlyConfig
from switchx.moe.layer import MoeLayer
from switchx.nn.attention import GroupedQueryAttention, attention_mask, mask_to_bias
from switchx.nn.linear import DenseGeneral, Embed
from switchx.nn.mlp import MlpBlock
from switchx.nn.norm import RMSNorm

ACTIVATION_AXES = (BATCH, LENGTH, EMBED)


class DecoderOnlyLayer(nn.Module):
  config: DecoderOnlyConfig
  sparse: bool = False

  @nn.compact
  def __call__(self, x, positions, bias, token_mask, train: bool, decode: bool = False):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=not train)
    h = RMSNorm(cfg.norm_epsilon, dtype, name="pre_attention_layer_norm")(x)
    h = GroupedQueryAttention(cfg.num_heads, cfg.num_kv_heads, cfg.kv_dim, cfg.rope_theta, cfg.dropout_rate,
                              cfg.init_scale, dtype, cfg.qk_norm, cfg.qkv_bias, cfg.norm_epsilon,
                              name="attention")(h, positions, bias, not train, decode)
    x = x + dropout(h)
    h = RMSNorm(cfg.norm_epsilon, dtype, name="pre_mlp_layer_norm")(x)
    if self.sparse:
      h, aux = MoeLayer.for_model(cfg, name="moe")(h, token_mask, train)
    else:
      h, aux = MlpBlock(cfg.d_ff, cfg.activation, cfg.dropout_rate, cfg.init_scale, dtype, name="mlp")(
          h, deterministic=not train), None
    x = x + dropout(h)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), aux


class DecoderOnly(nn.Module):
  config: DecoderOnlyConfig

  def setup(self):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, dtype)
    sparse = set(cfg.sparse_layers)
    self.layers = [DecoderOnlyLayer(cfg, i in sparse) for i in range(cfg.num_layers)]   # named layers_0, ...
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.final_norm = RMSNorm(cfg.norm_epsilon, dtype)
    if not cfg.tie_embeddings:
      self.logits_dense = DenseGeneral(cfg.vocab_size, (EMBED, VOCAB), init_scale=cfg.init_scale, dtype=dtype,
                                       out_dtype=jnp.float32)

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, dict]:
    return self._run(tokens, *self._causal_inputs(tokens, segment_ids, positions), train, decode=False)

  def decode(self, tokens: jax.Array) -> tuple[jax.Array, dict]:
    """Cached decoding (eval mode; apply with mutable=["cache"]) -> (logits [B, n, V], moe_aux).

    The first call finds no cache and creates an empty one for tokens' shape [B, L_max] (its logits are an
    ordinary forward pass's and can be ignored). Each later call takes the next n tokens of every row [B, n]
    (the prompt at once, then one token a step), at positions cache_index..+n-1 (then advanced by n), attending
    to themselves and everything before them through the cache. Rows hold no padding. Every cache leaf of rank
    >= 1 has the batch as its leading axis (beam search reorders them by it)."""
    cache = self.variables.get("cache", {})
    if "layers_0" not in cache:                 # the sizing call: every attention layer creates its cache
      return self._run(tokens, *self._causal_inputs(tokens), False, decode=True)
    first = cache["layers_0"]["attention"]      # every layer's cache is filled to the same index
    batch, n = tokens.shape
    start, max_length = first["cache_index"], first["cached_key"].shape[1]
    positions = jnp.broadcast_to(start + jnp.arange(n), (batch, n))                         # [B, n]
    visible = jnp.arange(max_length)[None, :] <= positions[0][:, None]                      # [n, L_max]
    bias = mask_to_bias(visible)[None, None]                                                 # [1, 1, n, L_max]
    return self._run(tokens, positions, bias, jnp.ones((batch, n), bool), False, decode=True)

  def _causal_inputs(self, tokens, segment_ids=None, positions=None):
    """(positions, bias, real) of an ordinary (uncached) forward pass."""
    real = tokens > 0 if segment_ids is None else segment_ids > 0                            # [B, L]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)               # [B, L]
    bias = mask_to_bias(attention_mask(real, real, segment_ids, segment_ids, causal=True))  # [B, 1, L, L]
    return positions, bias, real

  def _run(self, tokens, positions, bias, real, train: bool, decode: bool):
    cfg = self.config
    x = self.dropout(self.token_embedder(tokens), deterministic=not train)                 # [B, L, D]
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    moe_aux = {}
    for i, layer in enumerate(self.layers):
      x, aux = layer(x, positions, bias, real, train, decode)
      if aux is not None:
        moe_aux[f"decoder/layers_{i}"] = aux
    x = self.final_norm(x)
    if cfg.tie_embeddings:
      logits = self.token_embedder.attend(x)                                                 # [B, L, V] float32
    else:
      logits = self.logits_dense(x)                                                          # [B, L, V] float32
    return nn.with_logical_constraint(logits, (BATCH, LENGTH, VOCAB)), moe_aux

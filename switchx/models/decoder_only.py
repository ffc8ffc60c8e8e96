"""A decoder-only MoE language model (Mixtral, OLMoE, Qwen-MoE): the same MoE layer as the encoder-decoder.

Legend: B batch, L length, D d_model, V vocabulary.

    tokens [B, L] -> token_embedder -> x [B, L, D]
    per layer i:  x += GroupedQueryAttention(RMSNorm(x))        rotary positions, causal + padding + segment mask
                  x += FFN_i(RMSNorm(x))                        MlpBlock, or MoeLayer where config.sparse says
    logits [B, L, V] float32 = final_norm(x) @ logits_dense      (or the embedding, tie_embeddings)

Token id 0 is padding (never attended to, never routed), as everywhere in switchx. With packed rows, `segment_ids`
[B, L] (0: padding) keep sequences apart and `positions` [B, L] restart at 0 for each; without them every nonzero
token is real and positions count from 0. Returns (logits, moe_aux {"layers_i": that layer's losses/metrics}).
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
  def __call__(self, x, positions, bias, token_mask, train: bool):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=not train)
    h = RMSNorm(cfg.norm_epsilon, dtype, name="pre_attention_layer_norm")(x)
    h = GroupedQueryAttention(cfg.num_heads, cfg.num_kv_heads, cfg.kv_dim, cfg.rope_theta, cfg.dropout_rate,
                              cfg.init_scale, dtype, cfg.qk_norm, cfg.qkv_bias, cfg.norm_epsilon,
                              name="attention")(h, positions, bias, not train)
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

  @nn.compact
  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, dict]:
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    real = tokens > 0 if segment_ids is None else segment_ids > 0                            # [B, L]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)               # [B, L]
    bias = mask_to_bias(attention_mask(real, real, segment_ids, segment_ids, causal=True))  # [B, 1, L, L]
    embedder = Embed(cfg.vocab_size, cfg.d_model, dtype, name="token_embedder")
    x = nn.Dropout(cfg.dropout_rate)(embedder(tokens), deterministic=not train)              # [B, L, D]
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    moe_aux = {}
    sparse = set(cfg.sparse_layers)
    for i in range(cfg.num_layers):
      x, aux = DecoderOnlyLayer(cfg, i in sparse, name=f"layers_{i}")(x, positions, bias, real, train)
      if aux is not None:
        moe_aux[f"layers_{i}"] = aux
    x = RMSNorm(cfg.norm_epsilon, dtype, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = embedder.attend(x)                                                            # [B, L, V] float32
    else:
      logits = DenseGeneral(cfg.vocab_size, (EMBED, VOCAB), init_scale=cfg.init_scale, dtype=dtype,
                            out_dtype=jnp.float32, name="logits_dense")(x)                   # [B, L, V] float32
    return nn.with_logical_constraint(logits, (BATCH, LENGTH, VOCAB)), moe_aux

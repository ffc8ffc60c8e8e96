"""T5 v1.1 encoder-decoder whose feed-forward layers may be Switch / MoE layers.

Legend: B batch, Le encoder length, Ld decoder length, D d_model, H heads, V vocab.

    logits, moe_aux = EncoderDecoder(config).apply(
        {"params": params}, encoder_input_tokens, decoder_input_tokens, train=False)

Incremental decoding (switchx/decode.py drives it) runs the encoder once and the decoder one token at a time
over a key/value cache (the flax "cache" collection):

    encoded, _ = model.apply(variables, encoder_input_tokens, method=EncoderDecoder.encode)
    _, cache = model.apply(variables, encoded, encoder_input_tokens, jnp.zeros([B, L_max], int),
                           method=EncoderDecoder.decode, mutable=["cache"])        # creates an empty cache
    logits, aux = model.apply({**variables, **cache}, encoded, encoder_input_tokens, token [B, 1],
                              method=EncoderDecoder.decode, mutable=["cache"])     # one step -> [B, 1, V]

Token id 0 is padding. Packed examples carry *_segment_ids (0 = padding, 1, 2, ... one per example in a row)
and *_positions (restarting at 0 per example); attention never crosses segments. `moe_aux` maps each sparse
layer's name ("encoder/layers_1", ...) to its losses and router metrics (see moe/layer.py: router_stats).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switchx.axes import BATCH, EMBED, LENGTH, VOCAB
from switchx.config import ModelConfig, check_vocab
from switchx.moe.layer import MoeLayer
from switchx.nn.attention import MultiHeadAttention, RelativePositionBias, attention_mask, mask_to_bias
from switchx.nn.linear import DenseGeneral, Embed
from switchx.nn.mlp import MlpBlock
from switchx.nn.norm import make_norm
from switchx.nn.sinusoidal import sinusoidal_embedding

ACTIVATION_AXES = (BATCH, LENGTH, EMBED)


def feed_forward(cfg: ModelConfig, sparse: bool, x: jax.Array, token_mask: jax.Array, train: bool, task_ids=None):
  """The feed-forward slot of a layer (called inside a layer's compact method): a dense MLP ("mlp") or a
  MoE layer ("moe"), as the config's sparse layout says. -> (y, moe aux or None)."""
  if sparse:
    return MoeLayer.for_model(cfg, name="moe")(x, token_mask, train, task_ids)
  mlp = MlpBlock(cfg.d_ff, cfg.activation, cfg.dropout_rate, cfg.init_scale, jnp.dtype(cfg.dtype), cfg.use_bias,
                 name="mlp")
  return mlp(x, deterministic=not train), None


class EncoderLayer(nn.Module):
  config: ModelConfig
  sparse: bool = False

  @nn.compact
  def __call__(self, x, bias, token_mask, train: bool, task_ids=None):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=not train)
    h = norm(cfg, "pre_attention_layer_norm")(x)
    h = MultiHeadAttention(cfg.num_heads, cfg.kv_dim, cfg.dropout_rate, cfg.init_scale, dtype, cfg.use_bias,
                           name="attention")(h, h, bias, deterministic=not train)
    x = x + dropout(h)
    h = norm(cfg, "pre_mlp_layer_norm")(x)
    h, aux = feed_forward(cfg, self.sparse, h, token_mask, train, task_ids)
    x = x + dropout(h)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), aux


class DecoderLayer(nn.Module):
  config: ModelConfig
  sparse: bool = False

  @nn.compact
  def __call__(self, x, encoded, self_bias, cross_bias, token_mask, train: bool, decode: bool = False,
               task_ids=None):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=not train)
    attention = lambda name: MultiHeadAttention(cfg.num_heads, cfg.kv_dim, cfg.dropout_rate, cfg.init_scale,
                                                dtype, cfg.use_bias, name=name)
    h = norm(cfg, "pre_self_attention_layer_norm")(x)
    x = x + dropout(attention("self_attention")(h, h, self_bias, deterministic=not train,
                                                kv_cache="self" if decode else None))
    h = norm(cfg, "pre_cross_attention_layer_norm")(x)
    x = x + dropout(attention("encoder_decoder_attention")(h, encoded, cross_bias, deterministic=not train,
                                                           kv_cache="cross" if decode else None))
    h = norm(cfg, "pre_mlp_layer_norm")(x)
    h, aux = feed_forward(cfg, self.sparse, h, token_mask, train, task_ids)
    x = x + dropout(h)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), aux


def norm(cfg: ModelConfig, name: str) -> nn.Module:
  return make_norm(cfg.norm, cfg.layer_norm_epsilon, jnp.dtype(cfg.dtype), name)


def _positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
  """[B|1, L] positions (relative bias or sinusoids): given ones, or 0..L-1 shared by all rows."""
  if positions is not None:
    return positions
  return jnp.arange(tokens.shape[1])[None, :]


def embed(cfg: ModelConfig, embedder: Embed, tokens: jax.Array, positions: jax.Array) -> jax.Array:
  """Token embeddings [B, L, D] (x sqrt(D) with scale_embeddings), plus fixed sinusoids of the positions
  [B|1, L] with position_embedding="sinusoidal" (T5's relative positions enter as attention biases instead)."""
  x = embedder(tokens)
  if cfg.scale_embeddings:
    x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
  if cfg.position_embedding == "sinusoidal":
    x = (x.astype(jnp.float32) + sinusoidal_embedding(positions, cfg.d_model)).astype(x.dtype)
  return x


class Encoder(nn.Module):
  config: ModelConfig
  embedder: Embed

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, train: bool = False, task_ids=None):
    cfg = self.config
    valid = tokens > 0                                                        # [B, Le]
    positions = _positions(tokens, positions)
    bias = mask_to_bias(attention_mask(valid, valid, segment_ids, segment_ids))  # [B, 1, Le, Le]
    if cfg.position_embedding == "relative":
      bias = bias + RelativePositionBias(cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                                         cfg.num_heads, bidirectional=True, name="relpos_bias")(positions, positions)

    x = embed(cfg, self.embedder, tokens, positions)                          # [B, Le, D]
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    sparse, aux = set(cfg.encoder_sparse_layers), {}
    for i in range(cfg.num_encoder_layers):
      x, layer_aux = EncoderLayer(cfg, i in sparse, name=f"layers_{i}")(x, bias, valid, train, task_ids)
      if layer_aux is not None:
        aux[f"encoder/layers_{i}"] = layer_aux
    x = norm(cfg, "final_layer_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=not train), aux


class Decoder(nn.Module):
  config: ModelConfig
  embedder: Embed

  @nn.compact
  def __call__(self, encoded, encoder_valid, tokens, target_tokens=None, segment_ids=None, positions=None,
               encoder_segment_ids=None, train: bool = False, decode: bool = False, task_ids=None):
    """decode=True: cached decoding (see EncoderDecoder.decode); the first such call creates the cache."""
    cfg = self.config
    relpos_bias = None
    if cfg.position_embedding == "relative":
      relpos_bias = RelativePositionBias(cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                                         cfg.num_heads, bidirectional=False, name="relpos_bias")
    if decode and self.has_variable("cache", "cache_index"):
      valid, positions, self_bias, cross_bias = self._step_biases(tokens, encoder_valid, relpos_bias)
    else:
      if decode:  # the call that creates the cache: nothing is in it yet
        self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        self.variable("cache", "cache_mask", jnp.zeros, tokens.shape, bool)   # [B, L_max]
      # Decoder inputs start with token 0, so padding is told by segment ids or targets, not by the inputs.
      if segment_ids is not None:
        valid = segment_ids > 0
      elif target_tokens is not None:
        valid = target_tokens > 0
      else:
        valid = jnp.ones(tokens.shape, bool)                                  # [B, Ld]
      positions = _positions(tokens, positions)
      self_bias = mask_to_bias(attention_mask(valid, valid, segment_ids, segment_ids, causal=True))
      if relpos_bias is not None:
        self_bias = self_bias + relpos_bias(positions, positions)
      cross_bias = mask_to_bias(attention_mask(valid, encoder_valid, segment_ids, encoder_segment_ids))

    x = embed(cfg, self.embedder, tokens, positions)                          # [B, Ld, D]
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    sparse, aux = set(cfg.decoder_sparse_layers), {}
    for i in range(cfg.num_decoder_layers):
      x, layer_aux = DecoderLayer(cfg, i in sparse, name=f"layers_{i}")(
          x, encoded, self_bias, cross_bias, valid, train, decode, task_ids)
      if layer_aux is not None:
        aux[f"decoder/layers_{i}"] = layer_aux
    x = norm(cfg, "final_layer_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)

    if cfg.logits_via_embedding:                                              # tied, rescaled as in T5 (not NLLB)
      logits = self.embedder.attend(x * cfg.d_model ** -0.5 if cfg.rescale_tied_logits else x)
    else:
      logits = DenseGeneral(cfg.vocab_size, (EMBED, VOCAB), init_scale=cfg.init_scale,
                            dtype=jnp.dtype(cfg.dtype), out_dtype=jnp.float32, name="logits_dense")(x)
    return nn.with_logical_constraint(logits, (BATCH, LENGTH, VOCAB)), aux  # [B, Ld, V] float32

  def _step_biases(self, tokens, encoder_valid, relpos_bias):
    """Validity, position [1, 1] and attention biases of one cached step: the new token [B, 1] sits at position
    cache_index and sees the cache slots filled so far and itself (causal over the cache; no padding or segments
    at decode time)."""
    cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    cache_mask = self.variable("cache", "cache_mask", jnp.zeros, tokens.shape, bool)
    batch, max_length = cache_mask.value.shape
    if tokens.shape != (batch, 1):
      raise ValueError(f"a cached decoding step takes decoder_input_tokens of shape [{batch}, 1] (one token per "
                       f"row, the cache's batch), got {tokens.shape}.")
    index = cache_index.value
    slots = jnp.arange(max_length)
    cache_mask.value = cache_mask.value | (slots == index)[None, :]           # [B, L_max]
    cache_index.value = index + 1
    position = jnp.reshape(index, (1, 1))                                    # [1, 1]
    self_bias = mask_to_bias(cache_mask.value[:, None, None, :])             # [B, 1, 1, L_max]
    if relpos_bias is not None:
      self_bias = self_bias + relpos_bias(position, slots[None, :])          # [B, H, 1, L_max]
    valid = jnp.ones((batch, 1), bool)
    cross_bias = mask_to_bias(attention_mask(valid, encoder_valid))          # [B, 1, 1, Le]
    return valid, position, self_bias, cross_bias


class EncoderDecoder(nn.Module):
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, jnp.dtype(cfg.dtype),
                                stddev=cfg.d_model ** -0.5 if cfg.scale_embeddings else 1.0)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, encoder_task_ids=None, decoder_task_ids=None, train: bool = False):
    """-> (logits [B, Ld, V] float32, moe_aux {layer name: {metric: value}}). *_task_ids [B] or [B, L] int:
    each row's or token's task, read by MoeConfig.route_by="task" routers only."""
    for name, tokens in (("encoder_input_tokens", encoder_input_tokens),
                         ("decoder_input_tokens", decoder_input_tokens)):
      if not isinstance(tokens, jax.core.Tracer) and tokens.size:  # concrete inputs: check them now
        check_vocab(self.config, int(np.max(np.asarray(tokens))), name)
    encoded, enc_aux = self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions, train,
                                    encoder_task_ids)
    logits, dec_aux = self.decoder(encoded, encoder_input_tokens > 0, decoder_input_tokens,
                                   decoder_target_tokens, decoder_segment_ids, decoder_positions,
                                   encoder_segment_ids, train, task_ids=decoder_task_ids)
    return logits, {**enc_aux, **dec_aux}

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None, train: bool = False,
             encoder_task_ids=None):
    """The encoder alone (run once before decoding) -> (encoded [B, Le, D], moe_aux of its sparse layers)."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions, train, encoder_task_ids)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_task_ids=None):
    """One step of cached decoding (eval mode; apply with mutable=["cache"]) -> (logits [B, 1, V], moe_aux).

    The first call finds no cache and creates an empty one for decoder_input_tokens' shape [B, L_max] (its
    logits are those of an ordinary forward pass and can be ignored); it also projects the encoder output's
    cross-attention keys and values once. Each later call takes the next input token [B, 1] (0, the start
    token, then the previous output), which sits at position cache_index (incremented), and attends to the
    tokens before it through the cache. encoder_input_tokens [B, Le] only tell padding (0) from real tokens.
    Every cache leaf of rank >= 1 has the batch as its leading axis (beam search reorders them by it); the
    cache_index scalars are shared by all rows.
    """
    return self.decoder(encoded, encoder_input_tokens > 0, decoder_input_tokens, train=False, decode=True,
                        task_ids=decoder_task_ids)

"""Parameter counts and FLOPs from shapes alone (jax.eval_shape: nothing is allocated, any size works)."""

from __future__ import annotations

import collections
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchx.config import DecoderOnlyConfig, ModelConfig
from switchx.models.decoder_only import DecoderOnly
from switchx.models.encoder_decoder import EncoderDecoder


def abstract_params(config: ModelConfig | DecoderOnlyConfig) -> dict:
  """The parameter tree as ShapeDtypeStructs inside their LogicallyPartitioned boxes (names kept)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  if isinstance(config, DecoderOnlyConfig):
    return jax.eval_shape(DecoderOnly(config).init, jax.random.PRNGKey(0), tokens)["params"]
  return jax.eval_shape(EncoderDecoder(config).init, jax.random.PRNGKey(0), tokens, tokens)["params"]


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{'encoder/layers_1/moe/experts/wi': (E, D, F), ...}"""
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(config)))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}


def experts_per_token(config: ModelConfig) -> float:
  """Experts that process each token on average: k for tokens-choose; the capacity factor for experts-choose."""
  moe = config.moe
  if moe.router == "tokens_choose":
    return float(moe.top_k)
  factor = moe.train_capacity_factor
  return float(moe.num_experts) if factor <= 0 else min(float(factor), float(moe.num_experts))


@functools.lru_cache(maxsize=256)
def param_counts(config: ModelConfig) -> dict[str, int]:
  """total, expert (all experts' weights), active (per token: non-expert + the experts a token uses)."""
  shapes = param_shapes(config)
  size = lambda shape: math.prod(shape)
  total = sum(size(s) for s in shapes.values())
  expert = sum(size(s) for path, s in shapes.items() if "/experts/" in path)
  per_expert = expert / config.moe.num_experts
  active = total - expert + round(per_expert * experts_per_token(config))
  return {"total_params": total, "expert_params": expert, "active_params": int(active)}


def flops_per_token(config: ModelConfig, inputs_length: int = 512, targets_length: int = 114) -> float:
  """Forward FLOPs (2 per multiply-add) per token, averaged over the encoder and decoder tokens of one
  example of (inputs_length, targets_length) tokens. Counts every matmul the model defines (projections,
  attention scores and mixing, dense and expert FFNs with k experts per token, routers, output logits);
  not the dispatch/combine data movement, norms or softmaxes. A decoder-only model: per token of a sequence
  of inputs_length + targets_length tokens (decoder_only_flops_per_token)."""
  if isinstance(config, DecoderOnlyConfig):
    return decoder_only_flops_per_token(config, inputs_length + targets_length)
  d, inner, f = config.d_model, config.num_heads * config.kv_dim, config.d_ff
  le, ld = inputs_length, targets_length
  ffn_matrices = 3 if config.activation.startswith("gated-") else 2
  dense_ffn = 2 * ffn_matrices * d * f
  shared = config.moe.shared_expert_d_ff
  sparse_ffn = (2 * d * config.moe.num_router_experts
                + experts_per_token(config) * 2 * ffn_matrices * d * config.expert_d_ff
                + (2 * ffn_matrices * d * shared + 2 * d * config.moe.shared_expert_gate if shared else 0))
  enc_sparse, dec_sparse = set(config.encoder_sparse_layers), set(config.decoder_sparse_layers)

  total = 0.0
  for i in range(config.num_encoder_layers):
    attention = 2 * 4 * d * inner + 2 * 2 * le * inner          # q, k, v, out; scores and mixing
    total += le * (attention + (sparse_ffn if i in enc_sparse else dense_ffn))
  for i in range(config.num_decoder_layers):
    self_attention = 2 * 4 * d * inner + 2 * 2 * ld * inner
    cross_attention = 2 * 2 * d * inner + 2 * 2 * le * inner    # q and out per decoder token ...
    total += ld * (self_attention + cross_attention + (sparse_ffn if i in dec_sparse else dense_ffn))
    total += le * 2 * 2 * d * inner                             # ... k and v per encoder token
  total += ld * 2 * d * config.vocab_size                       # output logits
  return total / (le + ld)


def _ffn_flops(config) -> tuple[float, float]:
  """(dense FFN, sparse FFN) forward FLOPs per token of one layer: routers, k experts, a shared expert."""
  d, f = config.d_model, config.d_ff
  ffn_matrices = 3 if config.activation.startswith("gated-") else 2
  shared = config.moe.shared_expert_d_ff
  sparse = (2 * d * config.moe.num_router_experts
            + experts_per_token(config) * 2 * ffn_matrices * d * config.expert_d_ff
            + (2 * ffn_matrices * d * shared + 2 * d * config.moe.shared_expert_gate if shared else 0))
  return 2 * ffn_matrices * d * f, sparse


def decoder_only_flops_per_token(config: DecoderOnlyConfig, length: int) -> float:
  """Forward FLOPs per token of a causal LM over sequences of `length` tokens (a token attends to length / 2
  keys on average): projections (grouped-query: k and v have num_kv_heads), scores and mixing, FFNs, logits."""
  d, dh = config.d_model, config.kv_dim
  q_inner, kv_inner = config.num_heads * dh, config.num_kv_heads * dh
  dense_ffn, sparse_ffn = _ffn_flops(config)
  sparse = set(config.sparse_layers)
  per_layer = [2 * d * (2 * q_inner + 2 * kv_inner) + 2 * 2 * (length / 2) * q_inner
               + (sparse_ffn if i in sparse else dense_ffn) for i in range(config.num_layers)]
  return sum(per_layer) + 2 * d * config.vocab_size


def summary(config: ModelConfig, inputs_length: int = 512, targets_length: int = 114) -> dict:
  """What `switchx params --json` prints: total / expert / active parameters and forward FLOPs per token."""
  return {**param_counts(config), "flops_per_token": flops_per_token(config, inputs_length, targets_length)}


def module_table(config: ModelConfig) -> list[tuple[str, int]]:
  """Parameter counts grouped by module kind ('encoder attention', 'decoder experts', ...), in model order."""
  groups: dict[str, int] = collections.OrderedDict()
  if isinstance(config, DecoderOnlyConfig):
    for path, shape in param_shapes(config).items():
      parts = path.split("/")
      kind = {"token_embedder": "token embedding", "final_norm": "norms", "logits_dense": "logits dense"}.get(parts[0])
      if kind is None:                                       # layers_i/<module>/...
        if "experts" in parts:
          kind = "experts"
        elif any(p.startswith("shared_expert") for p in parts):
          kind = "shared experts"
        elif parts[-1] == "router":
          kind = "routers"
        else:
          kind = "norms" if "norm" in parts[1] else parts[1]  # attention, mlp
      groups[kind] = groups.get(kind, 0) + math.prod(shape)
    order = ("token embedding", "attention", "mlp", "routers", "experts", "shared experts", "norms", "logits dense")
    return sorted(groups.items(), key=lambda item: order.index(item[0]))
  for path, shape in param_shapes(config).items():
    parts = path.split("/")
    if parts[0] == "token_embedder":
      kind = "token embedding"
    elif parts[1] in ("relpos_bias", "final_layer_norm", "logits_dense"):
      kind = f"{parts[0]} {parts[1].replace('_', ' ')}"
    elif "experts" in parts:
      kind = f"{parts[0]} experts"
    elif "shared_expert" in parts or "shared_expert_gate" in parts:
      kind = f"{parts[0]} shared experts"
    elif parts[-1] == "router":
      kind = f"{parts[0]} routers"
    else:
      kind = f"{parts[0]} {'norms' if 'norm' in parts[2] else parts[2].replace('_', ' ')}"
    groups[kind] = groups.get(kind, 0) + math.prod(shape)
  order = lambda kind: (("token", "encoder", "decoder").index(kind.split()[0]), kind.endswith("logits dense"))
  return sorted(groups.items(), key=lambda item: order(item[0]))


def format_count(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(int(n))

"""The sparse feed-forward layer: group -> route -> dispatch -> experts -> combine, plus its losses and metrics.

Legend: B batch, L length, T = B*L tokens, G groups, S tokens per group (G*S = T), E experts,
C capacity (slots per expert per group), K experts per token, D d_model, F expert d_ff.

    x [B, L, D] -> tokens [G, S, D]
    router logits [G, S, E] in float32 (jitter only on the float32 copy used for routing)
    decision (moe/routing.py) -> one of
      einsum:   dispatch [G, S, E, C], combine [G, S, E, C];  expert inputs = einsum('gsec,gsd->egcd')
      index:    slot_token [G, E, C], slot_gate [G, E, C];    expert inputs = gather, outputs = scatter-add
      dropless: slot_token [P, N, b], slot_gate [P, N, b], block_expert [P, N]: every routed token of each of
                the P batch shards, sorted by expert into N blocks of b (no capacity, nothing dropped);
                gather, scatter-add as the index path; where blocks do not pay (dropless_block_size 0: a
                decoding step), every expert computes every token, combined by gates [G, S, E] (0: not routed)
    experts: [E, G, C, D] -> [E, G, C, D]  (weights [E, D, F], [E, F, D]); dropless: [P*N, 1, b, D], each
             block through its expert's weights (gathered: [P*N, D, F])
    y [G, S, D] -> [B, L, D]; a token with no expert slot gets exactly zero (the residual carries it).

MoeConfig.semantics="transformers" reproduces transformers' SwitchTransformers: G = B and S = L (one group per
sequence), C = expert_capacity, every token routed (padding too), so the metrics count every token. Its model-level
losses come from losses.transformers_router_losses (docs/interop.md).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchx.config import ModelConfig
from switchx.moe.routing import ExpertChoice, TokenChoice, experts_choose, tokens_choose
from switchx.nn.linear import matmul, t5_kernel_init
from switchx.nn.mlp import activation_fn


def group_shape(num_tokens: int, max_group_size: int, num_partitions: int = 1) -> tuple[int, int]:
  """(G, S): the fewest groups of at most `max_group_size` tokens that split the tokens exactly, with G a
  multiple of `num_partitions` (so groups divide evenly over the devices that split the batch).

  This is the original (flaxformer) policy: group_size is a maximum, and the effective S is the largest size
  <= group_size that divides the token count. It is reported in each layer's metrics ("group_size").
  """
  if num_tokens % num_partitions:
    raise ValueError(
        f"{num_tokens} tokens cannot be split into routing groups over {num_partitions} batch shards: make "
        f"batch_size * length a multiple of {num_partitions} (MoeConfig.num_group_partitions, the mesh's "
        "data x expert size).")
  num_groups = max(-(-num_tokens // max_group_size), 1)
  while num_tokens % num_groups or num_groups % num_partitions:
    num_groups += 1
  return num_groups, num_tokens // num_groups


# Up to this many tokens per expert (G * C), expert_matmul fixes its dots' layouts; above it, plain autodiff.
FIXED_LAYOUT_MAX_TOKENS = 128


# Moving one expert weight matrix through memory, in units of one token through that matrix (2*D*F FLOPs):
# 4*D*F bytes at ~10 FLOPs per byte (a CPU's compute / memory bandwidth balance).
WEIGHT_PASS = 20


def dropless_block_size(num_tokens: int, top_k: int, num_experts: int) -> int:
  """Block size b of the dropless layout for `num_tokens` tokens with `top_k` choices each, or 0 to have every
  expert compute every token of its group instead (which drops nothing either).

  b is the largest power of two <= the mean load (choices per expert), at most FIXED_LAYOUT_MAX_TOKENS, so the
  N blocks hold at most T*K + E*(b-1) < 2*T*K slots. Each block also gathers its expert's weights (read,
  written, read again by the product), so blocks win when tokens are many per expert (an encoder pass: E=8,
  1,024 tokens; or many experts) and lose when they are few (a decoding step: 8 tokens), where the E*T slots
  read each expert's weights once. Costs in token-matrix units: blocks N*b + 3*WEIGHT_PASS*N, slots
  E*T + WEIGHT_PASS*E.
  """
  choices = num_tokens * top_k
  mean_load = choices // num_experts
  if mean_load < 1:
    return 0
  block = min(1 << (mean_load.bit_length() - 1), FIXED_LAYOUT_MAX_TOKENS)
  num_blocks = (choices + num_experts * (block - 1)) // block
  blocks_cost = num_blocks * block + 3 * WEIGHT_PASS * num_blocks
  slots_cost = num_experts * num_tokens + WEIGHT_PASS * num_experts
  return block if blocks_cost < slots_cost else 0


# On XLA's CPU backend, "auto" expert dtype trains the experts in bfloat16 only from this many tokens per expert.
BF16_MIN_TOKENS = 128


def expert_compute_dtype(setting: str, model_dtype, tokens_per_expert: int, train: bool) -> jnp.dtype:
  """The dtype the expert FFN computes in (MoeConfig.expert_dtype). "auto" is the model's dtype, except when
  training on XLA's CPU backend with fewer than BF16_MIN_TOKENS tokens per expert, where it is float32. There a
  batched dot with one weight matrix per expert and few tokens reads more weight than it computes: in bfloat16
  it misses the CPU's matrix units, runs slower than in float32 and adds a cast of every expert weight.
  Measured on a 2-core Xeon with AMX (expert FFN dots, 8-128 experts): bfloat16 1.5-3x slower than float32 at
  8-32 tokens per expert, 1.3-2.3x faster at 128-512; training step of benchmarks case 1 with the rest of the
  model in bfloat16, against bfloat16 experts: 1.70x at 128 experts, 1.00x at 8. Not when decoding: the
  weights' cast is hoisted out of the decoding loop, and bfloat16 experts decode 1.13x faster there.
  Weights stay float32 parameters either way; activations enter and leave the experts in the model's dtype.
  """
  if setting != "auto":
    return jnp.dtype(setting)
  if train and jax.default_backend() == "cpu" and tokens_per_expert < BF16_MIN_TOKENS:
    return jnp.dtype(jnp.float32)
  return jnp.dtype(model_dtype)


def expert_matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """Per-expert matmul [E, T, I] x [E, I, O] -> [E, T, O] in `dtype` (operands cast, float32 accumulation).

  The product einsum('eti,eio->eto'). With few tokens per expert (T <= FIXED_LAYOUT_MAX_TOKENS, the usual case
  with many experts) it runs with a hand-written backward that fixes the memory layout of every dot: XLA's CPU
  backend runs a batched dot several times faster when its weight is contracted along its contiguous (last)
  axis and its output keeps the tokens last than in the layouts autodiff and its layout passes choose.
  Optimization barriers keep the transposed operands and outputs from being folded back into the dots. The
  forward is the plain product, on the input as it comes: XLA's CPU backend runs it on both cores, while the
  same product from the transposed input (which the backward keeps) ran on one (15 against 27 ms at 128 experts
  x 16 tokens, D 256 -> F 1024; training step 1.04-1.06x at 128 and 512 experts).
  Measured on the expert FFN's forward + backward (2-core CPU): 1.5x at 128 experts x 16 tokens, 1.2x at
  64 x 32; even at 8 x 128; slower from 256 tokens on, where the transposes cost more than they save, hence the
  threshold. Outside differentiation (inference) the forward is the plain einsum, faster there. Results equal
  the einsum's up to float32 summation order; dw comes back in w's dtype (float32 parameters), accumulated in
  float32.
  """
  if x.shape[1] > FIXED_LAYOUT_MAX_TOKENS:
    return matmul("eti,eio->eto", x, w, dtype)
  return _expert_matmul(x.astype(dtype), w, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _expert_matmul(x, w, dtype):
  # Not differentiated (evaluation, decoding): the plain product, which XLA's CPU backend runs faster than
  # the fixed layouts when no backward will reuse the transposed input (0.4-0.9x the time, 8-512 experts).
  return matmul("eti,eio->eto", x, w, dtype)


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

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, block_expert: jax.Array | None = None) -> jax.Array:
    """x [E, G, C, D] -> [E, G, C, D]; with block_expert [N] (dropless), x [N, 1, b, D] -> [N, 1, b, D]:
    block n goes through expert block_expert[n]."""
    rows, num_groups, capacity, d_model = x.shape
    in_dtype = x.dtype
    dtype = expert_compute_dtype(self.expert_dtype, self.dtype, num_groups * capacity, train=not deterministic)
    act, gated = activation_fn(self.activation)
    init = t5_kernel_init(self.init_scale, num_in=1, num_out=1, num_batch=1)  # fan_in per expert

    def kernel(name, shape, axes):
      w = self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
      return w if block_expert is None else jnp.take(w, block_expert, axis=0)  # [N, ...]: one per block

    wi_shape, wi_axes = (self.num_experts, d_model, self.d_ff), ("expert", "embed", "expert_mlp")
    x = x.reshape(rows, num_groups * capacity, d_model)                        # [E, G*C, D]
    if gated:
      h = act(expert_matmul(x, kernel("wi_0", wi_shape, wi_axes), dtype))
      h = h * expert_matmul(x, kernel("wi_1", wi_shape, wi_axes), dtype)
    else:
      h = act(expert_matmul(x, kernel("wi", wi_shape, wi_axes), dtype))              # [E, G*C, F]
    if block_expert is None:
      h = nn.with_logical_constraint(h, ("expert", "unmodeled", "expert_mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)          # expert dropout
    wo = kernel("wo", (self.num_experts, self.d_ff, d_model), ("expert", "expert_mlp", "embed"))
    out = expert_matmul(h, wo, dtype)                                          # [E, G*C, D]
    return out.reshape(rows, num_groups, capacity, d_model).astype(in_dtype)


class MoeLayer(nn.Module):
  """A routed feed-forward layer. Returns (y [B, L, D], aux) where aux holds this layer's losses/metrics."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, token_mask: jax.Array, train: bool) -> tuple[jax.Array, dict]:
    cfg, moe = self.config, self.config.moe
    dtype = jnp.dtype(cfg.dtype)
    batch, length, d_model = x.shape
    hf_semantics = moe.semantics == "transformers"
    if hf_semantics:  # transformers' SparseMLP: each sequence is a group, and every token (padding too) is routed
      num_groups, group_size = batch, length
      token_mask = jnp.ones((batch, length), bool)
    else:
      num_groups, group_size = group_shape(batch * length, moe.group_size, moe.num_group_partitions)
    num_experts, capacity = moe.num_experts, moe.capacity(group_size, train=train)
    block, parts = 0, moe.num_group_partitions   # dropless blocks are laid out within each batch shard
    if moe.dispatch == "dropless":  # nothing dropped: sorted blocks, or (block 0) every expert on every token
      capacity = group_size
      block = dropless_block_size(num_groups * group_size // parts, moe.top_k, num_experts)

    tokens = x.reshape(num_groups, group_size, d_model)                        # [G, S, D]
    tokens = nn.with_logical_constraint(tokens, ("batch", "unmodeled", "embed"))
    mask = token_mask.reshape(num_groups, group_size).astype(bool)             # [G, S]

    # 1. Route, always in float32 ("selective precision"). Jitter touches only this copy.
    router_in = tokens.astype(jnp.float32)
    if train and moe.jitter_noise > 0:
      router_in *= jax.random.uniform(self.make_rng("jitter"), router_in.shape, jnp.float32,
                                      1.0 - moe.jitter_noise, 1.0 + moe.jitter_noise)
    router_kernel = self.param(
        "router", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("embed", "unmodeled")),
        (d_model, num_experts), jnp.float32)
    logits = jnp.einsum("gsd,de->gse", router_in, router_kernel,
                        precision=jax.lax.Precision.HIGHEST)                   # [G, S, E] float32
    probs = jax.nn.softmax(logits, axis=-1)
    self.sow("intermediates", "router_logits", logits)
    if moe.router == "experts_choose":
      decision = experts_choose(probs, mask, capacity=capacity)
    else:
      random_second = train and moe.top_k > 1 and moe.second_expert_policy == "random"
      decision = tokens_choose(
          probs, mask, k=moe.top_k, capacity=capacity, second_expert_policy=moe.second_expert_policy,
          second_expert_threshold=moe.second_expert_threshold, normalize_gates=moe.normalize_gates,
          batch_prioritized=moe.batch_prioritized, rng=self.make_rng("routing") if random_second else None)

    # 2. Dispatch: move each token into its expert's buffer.
    block_expert = None
    every_token = moe.dispatch == "dropless" and not block                    # tokens_choose (MoeConfig checks)
    if every_token:  # every expert computes every token of its group; the gates pick what each token keeps
      gates = jnp.einsum("gske,gsk->gse", jax.nn.one_hot(decision.expert_index, num_experts, dtype=jnp.float32),
                         jnp.where(decision.routed, decision.gate, 0.0))          # [G, S, E]
      expert_in = jnp.broadcast_to(tokens[None], (num_experts,) + tokens.shape)   # [E, G, S, D]
    elif block:  # each of the P batch shards sorts its own G/P groups' tokens: no token crosses shards
      shards = jax.tree_util.tree_map(lambda a: a.reshape((parts, -1) + a.shape[1:]), decision)
      slot_token, slot_gate, block_expert = jax.vmap(lambda d: d.blocks(num_experts, block))(shards)
      flat = jnp.pad(tokens.reshape(parts, -1, d_model), ((0, 0), (0, 1), (0, 0)))  # [P, G*S/P+1, D]; +1: empty
      expert_in = jax.vmap(lambda rows, idx: rows[idx])(flat, slot_token)     # [P, N, b, D]
      expert_in = nn.with_logical_constraint(expert_in, ("batch", None, None, "embed"))
      expert_in = expert_in.reshape((-1, 1) + expert_in.shape[2:])            # [P*N, 1, b, D]
      block_expert = block_expert.reshape(-1)                                  # [P*N]
    elif moe.dispatch == "einsum":
      dispatch, combine = decision.dense(num_experts, capacity)               # [G, S, E, C] each
      # Group-major dots, transposed outside: XLA's CPU backend rejects bf16 x bf16 -> f32 dots whose batch
      # dimension is not leading, and autodiff of an 'egcd' output produces exactly those.
      expert_in = jnp.swapaxes(matmul("gsec,gsd->gecd", dispatch, tokens, dtype), 0, 1)  # [E, G, C, D]
    else:
      slot_token, slot_gate = decision.slots(num_experts, capacity)          # [G, E, C] each
      padded = jnp.pad(tokens, ((0, 0), (0, 1), (0, 0)))                     # [G, S+1, D]; row S: empty slot
      expert_in = jax.vmap(lambda rows, idx: rows[idx])(padded, slot_token)  # [G, E, C, D]
      expert_in = jnp.swapaxes(expert_in, 0, 1)                              # [E, G, C, D]
    # Experts sharded over 'expert', groups over 'data': XLA inserts an all-to-all over the expert axis here.
    if not block:
      expert_in = nn.with_logical_constraint(expert_in, ("expert", "expert_group", "unmodeled", "embed"))
    self.sow("intermediates", "expert_inputs", expert_in)

    # 3. Experts.
    expert_out = Experts(num_experts, cfg.expert_d_ff, cfg.activation, cfg.expert_dropout_rate,
                         cfg.init_scale, dtype, moe.expert_dtype, name="experts")(expert_in, not train, block_expert)
    if not block:
      expert_out = nn.with_logical_constraint(expert_out, ("expert", "expert_group", "unmodeled", "embed"))

    # 4. Combine: weight each expert output by its gate and return it to its token (all-to-all back).
    if every_token:
      y = jnp.einsum("gse,egsd->gsd", gates, expert_out.astype(jnp.float32)).astype(dtype)  # [G, S, D]
    elif block:
      weighted = expert_out.reshape(slot_gate.shape + (d_model,)).astype(jnp.float32) * slot_gate[..., None]
      weighted = nn.with_logical_constraint(weighted, ("batch", None, None, "embed"))  # [P, N, b, D]
      y = jax.vmap(lambda idx, rows: jnp.zeros((flat.shape[1], d_model), jnp.float32).at[idx].add(rows))(
          slot_token, weighted)[:, :-1]                                        # [P, G*S/P, D]
      y = y.reshape(num_groups, group_size, d_model).astype(dtype)             # [G, S, D]
    elif moe.dispatch == "einsum":
      y = matmul("gsec,gecd->gsd", combine, jnp.swapaxes(expert_out, 0, 1), dtype)  # [G, S, D]
    else:
      weighted = jnp.swapaxes(expert_out, 0, 1).astype(jnp.float32) * slot_gate[..., None]  # [G, E, C, D]
      y = jax.vmap(lambda idx, rows: jnp.zeros((group_size + 1, d_model), jnp.float32).at[idx].add(rows))(
          slot_token, weighted)[:, :group_size].astype(dtype)                 # [G, S, D]
    y = nn.with_logical_constraint(y, ("batch", "unmodeled", "embed"))

    aux = router_stats(logits, probs, mask, decision, num_experts)
    aux["capacity"] = jnp.asarray(capacity, jnp.int32)
    aux["group_size"] = jnp.asarray(group_size, jnp.int32)
    if hf_semantics:  # per sequence, what losses.transformers_router_losses combines over a stack's layers
      aux["argmax_fraction"] = jax.nn.one_hot(jnp.argmax(logits, -1), num_experts).mean(1)  # [B, E]
      aux["mean_router_prob"] = probs.mean(1)                                              # [B, E]
    return y.reshape(batch, length, d_model), aux


def router_stats(logits: jax.Array, probs: jax.Array, mask: jax.Array, decision: TokenChoice | ExpertChoice,
                 num_experts: int) -> dict[str, jax.Array]:
  """Losses and metrics of one layer, over real (unmasked) tokens only.

  load_balance_loss: E * sum_e f_e * P_e per group (f_e: fraction of tokens choosing e before capacity, over all
    K choices; P_e: mean router probability), averaged over groups with real tokens. Uniform routing gives K.
  router_z_loss: mean of logsumexp(logits)^2 (ST-MoE), from the raw float32 logits.
  """
  real = mask.astype(jnp.float32)                                             # [G, S]
  num_real = jnp.maximum(real.sum(), 1.0)
  mean_real = lambda v: (v * real).sum() / num_real                          # mean of a [G, S] value
  z = jax.nn.logsumexp(logits, axis=-1)                                      # [G, S]
  stats = {
      "router_z_loss": mean_real(jnp.square(z)),
      "router_confidence": mean_real(probs.max(-1)),
      "router_entropy": mean_real(-(probs * jnp.log(jnp.maximum(probs, 1e-30))).sum(-1)),
  }
  if isinstance(decision, TokenChoice):
    chosen = jax.nn.one_hot(decision.expert_index, num_experts).sum(2) * real[..., None]  # [G, S, E]
    group_real = real.sum(1)                                                 # [G]
    per_token = 1.0 / jnp.maximum(group_real, 1.0)[:, None]
    fraction = chosen.sum(1) * per_token                                     # [G, E] f_e
    mean_prob = (probs * real[..., None]).sum(1) * per_token                 # [G, E] P_e
    per_group = num_experts * (fraction * mean_prob).sum(-1)                 # [G]
    has_real = (group_real > 0).astype(jnp.float32)
    stats["load_balance_loss"] = (per_group * has_real).sum() / jnp.maximum(has_real.sum(), 1.0)
    stats["expert_usage"] = chosen.sum((0, 1)) / jnp.maximum(chosen.sum(), 1.0)  # [E], sums to 1
    over_capacity = (decision.routed & ~decision.kept) * real[..., None]     # [G, S, K]
    stats["dropped_fraction_by_rank"] = over_capacity.sum((0, 1)) / num_real  # [K]
    served = decision.kept.any(-1)                                           # [G, S]
  else:
    stats["load_balance_loss"] = jnp.zeros((), jnp.float32)                  # balanced by construction
    stats["expert_usage"] = decision.valid.sum((0, 2)) / jnp.maximum(decision.valid.sum(), 1)  # [E]
    slot_token, _ = decision.slots(num_experts, decision.token_index.shape[-1])
    picks = jax.vmap(lambda idx: jnp.zeros(mask.shape[1] + 1).at[idx.reshape(-1)].add(1.0))(slot_token)
    served = picks[:, :-1] > 0                                               # [G, S]
    stats["dropped_fraction_by_rank"] = mean_real(1.0 - served)[None]       # [1]
  stats["dropped_fraction"] = mean_real(1.0 - served)                        # tokens no expert processed
  return stats

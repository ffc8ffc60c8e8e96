"""The router: tokens -> float32 logits -> probabilities -> a decision (which token goes to which slot, what gate).

Legend (shared with moe/): G groups, S tokens per group, E experts, C capacity (slots per expert per group),
K experts per token, D d_model.

    router_in [G, S, D] float32 (jitter, when training, multiplies only this copy: "selective precision")
    logits = router_in @ kernel [D, E]      [G, S, E] float32
      (route_by="task": logits = task_router[task_ids], a learned row per task, the same for all its tokens)
    probs = softmax(logits)                 [G, S, E]
    decision = STRATEGIES[moe.router](probs, mask, capacity, moe, rng, bias)   bias: bias balancing's [E] or None
    decision.gate *= moe.routed_scaling_factor                                (DeepSeek's; 1 for Switch)

A decision is a TokenChoice (each token picks its top-K experts) or an ExpertChoice (each expert picks its top-C
tokens); both convert to the forms moe/dispatch.py moves tokens with:
  * `dense()`  -> dispatch mask [G, S, E, C] (bool) and combine weights [G, S, E, C]   (einsum path)
  * `slots()`  -> slot_token [G, E, C] (int, S = empty slot) and slot_gate [G, E, C]   (index path)
A new router is a function here with the signature of STRATEGIES' values, its name in config.ROUTERS, and the
config fields it reads.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from switchx.axes import EMBED, UNMODELED
from switchx.config import MoeConfig


@flax.struct.dataclass
class TokenChoice:
  """Each token picks its top-K experts; capacity keeps the first C arrivals per expert."""

  expert_index: jax.Array  # [G, S, K] int32: the k-th choice of each token
  slot: jax.Array          # [G, S, K] int32: its position in that expert's buffer (meaningful where kept)
  gate: jax.Array          # [G, S, K] float32: its combine weight
  routed: jax.Array        # [G, S, K] bool: a real token whose k-th choice survived the 2nd-expert policy
  kept: jax.Array          # [G, S, K] bool: routed and within capacity

  def dense(self, num_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    expert = jax.nn.one_hot(self.expert_index, num_experts, dtype=jnp.float32)            # [G, S, K, E]
    # An out-of-range index one-hots to all zeros, so dropped choices vanish from both tensors.
    slot = jax.nn.one_hot(jnp.where(self.kept, self.slot, capacity), capacity, dtype=jnp.float32)  # [G,S,K,C]
    dispatch = jnp.einsum("gske,gskc->gsec", expert, slot)                                # [G, S, E, C]
    combine = jnp.einsum("gske,gskc->gsec", expert * self.gate[..., None], slot)          # [G, S, E, C]
    return dispatch > 0, combine

  def slots(self, num_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    num_groups, group_size, k = self.expert_index.shape
    g = jnp.broadcast_to(jnp.arange(num_groups)[:, None, None], (num_groups, group_size, k))
    s = jnp.broadcast_to(jnp.arange(group_size)[None, :, None], (num_groups, group_size, k))
    # Dropped choices are written to a spare expert row E that is cut off afterwards.
    e = jnp.where(self.kept, self.expert_index, num_experts)
    c = jnp.where(self.kept, self.slot, 0)
    slot_token = jnp.full((num_groups, num_experts + 1, capacity), group_size, jnp.int32)
    slot_token = slot_token.at[g, e, c].set(s)[:, :num_experts]                          # [G, E, C]
    slot_gate = jnp.zeros((num_groups, num_experts + 1, capacity), jnp.float32)
    slot_gate = slot_gate.at[g, e, c].set(self.gate)[:, :num_experts]                    # [G, E, C]
    return slot_token, slot_gate


@flax.struct.dataclass
class ExpertChoice:
  """Each expert picks its top-C tokens of the group; a token may be picked by several experts or none."""

  token_index: jax.Array  # [G, E, C] int32
  gate: jax.Array         # [G, E, C] float32 (0 where not valid)
  valid: jax.Array        # [G, E, C] bool: the slot holds a real token
  group_size: int = flax.struct.field(pytree_node=False, default=0)  # S

  def dense(self, num_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    group_size = self.group_size
    picked = jax.nn.one_hot(jnp.where(self.valid, self.token_index, group_size), group_size,
                            dtype=jnp.float32)                                            # [G, E, C, S]
    dispatch = jnp.einsum("gecs->gsec", picked)                                           # [G, S, E, C]
    combine = jnp.einsum("gecs,gec->gsec", picked, self.gate)                             # [G, S, E, C]
    return dispatch > 0, combine

  def slots(self, num_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    return jnp.where(self.valid, self.token_index, self.group_size), jnp.where(self.valid, self.gate, 0.0)


def _priority_order(probs: jax.Array, token_mask: jax.Array, batch_prioritized: bool) -> jax.Array:
  """[G, S] permutation: the order in which tokens claim expert slots (within one choice rank)."""
  num_groups, group_size, _ = probs.shape
  if not batch_prioritized:
    return jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))
  # Batch-prioritized routing: most confident tokens first; padding last. Stable, so ties keep sequence order.
  confidence = jnp.where(token_mask, probs.max(axis=-1), -1.0)
  return jnp.argsort(-confidence, axis=-1, stable=True)


def tokens_choose(probs: jax.Array, token_mask: jax.Array, *, k: int, capacity: int,
                  second_expert_policy: str = "all", second_expert_threshold: float = 0.2,
                  normalize_gates: bool = False, batch_prioritized: bool = False,
                  rng: jax.Array | None = None, selection_bias: jax.Array | None = None,
                  expert_map: tuple[int, ...] | None = None, num_experts: int | None = None,
                  normalize_kept_gates: bool = False) -> TokenChoice:
  """Top-k routing (k=1: Switch; k=2: GShard).

  probs [G, S, E] float32, token_mask [G, S] bool (False: padding, never routed).
  Priority: every token's 1st choice claims a slot before any 2nd choice; within a rank, sequence order
  (or router confidence with batch_prioritized). `rng` enables the random 2nd-expert policy (training).
  selection_bias [E] (bias balancing) is added to log(probs) (the logits up to a per-token constant) to choose
  the experts; the gates stay the probabilities. (In log space a bias step means the same at any router
  confidence; added to probabilities, as the paper's softmax variant, steps of 0.01 could not resolve the
  ~0.005 gaps between a confident router's other experts, and a collapsed router's load swung from expert to
  expert in tests/test_balance.py.)
  expert_map (merged experts) sends the chosen router column i to expert expert_map[i] of `num_experts`.
  normalize_kept_gates (NLLB-MoE) renormalises the gates after capacity: over the choices that were kept.
  """
  num_groups, group_size, num_columns = probs.shape
  num_experts = num_experts or num_columns
  if selection_bias is None:
    gate, expert_index = jax.lax.top_k(probs, k)                                           # [G, S, K]
  else:
    scores = jnp.log(jnp.maximum(probs, 1e-30)) + jax.lax.stop_gradient(selection_bias)     # [G, S, E]
    _, expert_index = jax.lax.top_k(scores, k)                                             # [G, S, K]
    gate = jnp.take_along_axis(probs, expert_index, axis=-1)                               # [G, S, K]
  if expert_map is not None:
    expert_index = jnp.asarray(expert_map, jnp.int32)[expert_index]                       # [G, S, K]
  relative = gate / jnp.maximum(gate.sum(-1, keepdims=True), 1e-9)                         # [G, S, K]
  if normalize_gates:
    gate = relative
  routed = jnp.broadcast_to(token_mask[..., None], gate.shape)                             # [G, S, K]
  if k > 1 and second_expert_policy == "random" and rng is not None:
    # GShard: a lower-ranked expert is kept with probability min(1, its relative gate / threshold).
    keep = jax.random.uniform(rng, gate.shape) < relative / second_expert_threshold
    routed &= keep.at[..., 0].set(True)

  order = _priority_order(probs, token_mask, batch_prioritized)                            # [G, S]
  choice = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32) * routed[..., None]  # [G, S, K, E]
  choice = jnp.take_along_axis(choice, order[:, :, None, None], axis=1)                    # priority order
  rank_major = jnp.swapaxes(choice, 1, 2).reshape(num_groups, k * group_size, num_experts)  # [G, K*S, E]
  position = (jnp.cumsum(rank_major, axis=1) - 1) * rank_major                             # [G, K*S, E]
  position = jnp.swapaxes(position.sum(-1).reshape(num_groups, k, group_size), 1, 2)       # [G, S, K]
  inverse = jnp.argsort(order, axis=-1)
  slot = jnp.take_along_axis(position, inverse[:, :, None], axis=1).astype(jnp.int32)      # sequence order
  kept = routed & (slot < capacity)
  if normalize_kept_gates:  # NLLB-MoE: the gates of the surviving choices sum to 1 (a lone survivor gets 1)
    kept_gate = jnp.where(kept, gate, 0.0)
    gate = kept_gate / jnp.maximum(kept_gate.sum(-1, keepdims=True), jnp.finfo(jnp.float32).eps)
  return TokenChoice(expert_index=expert_index.astype(jnp.int32), slot=slot,
                     gate=jnp.where(kept, gate, 0.0), routed=routed, kept=kept)


def experts_choose(probs: jax.Array, token_mask: jax.Array, *, capacity: int) -> ExpertChoice:
  """Expert-choice routing (Zhou et al. 2022): each expert takes the C tokens that prefer it most.

  Encoder only: a token's routing depends on the whole group, later tokens included.
  """
  group_size = probs.shape[1]
  scores = jnp.where(token_mask[..., None], probs, -1.0)                                   # padding last
  gate, token_index = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)                  # [G, E, C]
  valid = gate >= 0
  return ExpertChoice(token_index=token_index.astype(jnp.int32), gate=jnp.where(valid, gate, 0.0),
                      valid=valid, group_size=group_size)


STRATEGIES = {
    "tokens_choose": lambda probs, mask, capacity, moe, rng, bias: tokens_choose(
        probs, mask, k=moe.top_k, capacity=capacity, second_expert_policy=moe.second_expert_policy,
        second_expert_threshold=moe.second_expert_threshold, normalize_gates=moe.normalize_gates,
        batch_prioritized=moe.batch_prioritized, rng=rng, selection_bias=bias, expert_map=moe.expert_map,
        num_experts=moe.num_experts, normalize_kept_gates=moe.normalize_kept_gates),
    "experts_choose": lambda probs, mask, capacity, moe, rng, bias: experts_choose(probs, mask, capacity=capacity),
}


def balance_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Auxiliary-loss-free balancing's update (Wang et al. 2024, arXiv 2408.15664): each expert's selection bias
  moves by `rate` toward balance, up where the expert got fewer choices than the mean, down where more.
  bias [E] float32, load [E]: the step's choices per expert over the whole batch (every device, every
  micro-batch). The training step applies it after the optimizer's update, which never touches the bias."""
  return bias + rate * jnp.sign(load.mean() - load).astype(bias.dtype)


@flax.struct.dataclass
class Routing:
  logits: jax.Array                       # [G, S, E] float32, raw (the z-loss reads them)
  probs: jax.Array                        # [G, S, E] float32
  decision: TokenChoice | ExpertChoice
  selection_bias: jax.Array | None = None  # [E] float32 with bias balancing


class Router(nn.Module):
  """The router's kernel [D, E] (parameter "router", float32), its jitter and its strategy (MoeConfig.router).

  MoeLayer shares its scope with the router, so the kernel is the layer's parameter "router" (checkpoints and
  converted models keep their layout), and the rng streams are the layer's: "jitter", and "routing" for the
  random second expert."""

  moe: MoeConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array, capacity: int, train: bool,
               task_ids: jax.Array | None = None) -> Routing:
    """With MoeConfig.bias_balance_rate the layer also has the parameter "router_bias" [E]: added to the
    probabilities to choose experts only, and set by `balance_bias` after each step, never by the optimizer.
    With MoeConfig.route_by="task" the logits are rows of the parameter "task_router" [num_tasks, E], picked by
    task_ids [G, S] (each token's task); there is no kernel and no jitter."""
    moe = self.moe
    if moe.route_by == "task":
      table = self.param("task_router", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                                     (None, UNMODELED)),
                         (moe.num_tasks, moe.num_experts), jnp.float32)       # [num_tasks, E]
      logits = jnp.take(table, task_ids, axis=0)                               # [G, S, E]
    else:
      logits = self._token_logits(tokens, train)                               # [G, S, E]
    probs = jax.nn.softmax(logits, axis=-1)
    self.sow("intermediates", "router_logits", logits)
    random_second = train and moe.top_k > 1 and moe.second_expert_policy == "random"
    rng = self.make_rng("routing") if random_second and moe.router == "tokens_choose" else None
    bias = None
    if moe.bias_balance_rate > 0:   # a parameter only so that checkpoints, sharding and export carry it
      bias = self.param("router_bias", nn.with_logical_partitioning(nn.initializers.zeros, (UNMODELED,)),
                        (moe.num_experts,), jnp.float32)                       # [E]
    decision = STRATEGIES[moe.router](probs, mask, capacity, moe, rng, bias)
    if moe.routed_scaling_factor != 1.0:
      decision = decision.replace(gate=decision.gate * moe.routed_scaling_factor)
    return Routing(logits, probs, decision, bias)

  def _token_logits(self, tokens: jax.Array, train: bool) -> jax.Array:
    """tokens [G, S, D] -> logits [G, S, E] float32 from the kernel "router" [D, E] (jittered input in training)."""
    moe = self.moe
    router_in = tokens.astype(jnp.float32)                                     # [G, S, D]
    if train and moe.jitter_noise > 0:
      router_in *= jax.random.uniform(self.make_rng("jitter"), router_in.shape, jnp.float32,
                                      1.0 - moe.jitter_noise, 1.0 + moe.jitter_noise)
    kernel = self.param("router", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                               (EMBED, UNMODELED)),
                        (tokens.shape[-1], moe.num_router_experts), jnp.float32)  # [D, E] (merged: [D, R])
    return jnp.einsum("gsd,de->gse", router_in, kernel, precision=jax.lax.Precision.HIGHEST)

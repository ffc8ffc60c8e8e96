"""Routers: router probabilities -> routing decisions (which token goes to which expert slot, with what gate).

Legend (shared with moe/layer.py):
  G groups, S tokens per group, E experts, C capacity (slots per expert per group), K experts per token.

Two decision types, each convertible to the dispatch forms used by the layer:
  * `dense()`  -> dispatch mask [G, S, E, C] (bool) and combine weights [G, S, E, C]   (einsum path)
  * `slots()`  -> slot_token [G, E, C] (int, S = empty slot) and slot_gate [G, E, C]   (index path)
  * `blocks()` -> slot_token [N, b] (int into the G*S tokens, G*S = empty), slot_gate [N, b] and
                  block_expert [N]: the routed tokens sorted by expert in blocks of b   (dropless path;
                  tokens-choose only)
so the dispatch paths share the routing decisions and differ only in how tokens move.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


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

  def blocks(self, num_experts: int, block_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Every routed choice (capacity ignored: nothing is dropped), sorted by expert into blocks of
    `block_size` slots, each block holding one expert's tokens (its last block padded with empty slots).

    Returns slot_token [N, b] (index into the G*S tokens of all groups, G*S = empty), slot_gate [N, b] and
    block_expert [N]. N is static: sum_e ceil(n_e / b) <= (T*K + E*(b-1)) / b for any loads n_e summing to
    T*K, so the computation costs at most T*K + E*(b-1) token slots however the router splits the tokens
    (fixed-capacity dispatch without drops needs E*T). Unused blocks hold only empty slots.
    """
    num_groups, group_size, k = self.expert_index.shape
    b, num_choices = block_size, num_groups * group_size * k
    num_blocks = (num_choices + num_experts * (b - 1)) // b
    expert = jnp.where(self.routed, self.expert_index, num_experts).reshape(-1)            # [T*K], E: unrouted
    order = jnp.argsort(expert, stable=True)                                              # choices by expert
    load = jnp.zeros(num_experts + 1, jnp.int32).at[expert].add(1)[:num_experts]          # [E] n_e
    blocks = -(-load // b)                                                                 # [E]
    block_end = jnp.cumsum(blocks)                                                         # [E]
    first_slot = (block_end - blocks) * b                                                  # [E]
    first_choice = jnp.cumsum(load) - load                                                 # [E] in `order`
    sorted_expert = expert[order]                                                          # [T*K]
    safe = jnp.minimum(sorted_expert, num_experts - 1)
    slot = first_slot[safe] + jnp.arange(num_choices) - first_choice[safe]                 # [T*K]
    slot = jnp.where(sorted_expert < num_experts, slot, num_blocks * b)                   # unrouted: nowhere
    slot_choice = jnp.full(num_blocks * b, num_choices, jnp.int32).at[slot].set(
        order.astype(jnp.int32), mode="drop")                                              # [N*b]
    filled = slot_choice < num_choices
    slot_token = jnp.where(filled, slot_choice // k, num_groups * group_size)              # [N*b]
    slot_gate = jnp.where(filled, self.gate.reshape(-1)[jnp.minimum(slot_choice, num_choices - 1)], 0.0)
    block_expert = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(num_blocks), side="right"),
                               num_experts - 1).astype(jnp.int32)                          # [N]
    return slot_token.reshape(num_blocks, b), slot_gate.reshape(num_blocks, b), block_expert


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
                  rng: jax.Array | None = None) -> TokenChoice:
  """Top-k routing (k=1: Switch; k=2: GShard).

  probs [G, S, E] float32, token_mask [G, S] bool (False: padding, never routed).
  Priority: every token's 1st choice claims a slot before any 2nd choice; within a rank, sequence order
  (or router confidence with batch_prioritized). `rng` enables the random 2nd-expert policy (training).
  """
  num_groups, group_size, num_experts = probs.shape
  gate, expert_index = jax.lax.top_k(probs, k)                                             # [G, S, K]
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

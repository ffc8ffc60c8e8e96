"""How tokens travel to their experts and back: one dispatch / combine pair per path, behind one interface.

    dispatcher = make_dispatcher(moe, decision, group_size=S, capacity=C, block=b, dtype=...)
    expert_in = dispatcher.dispatch(tokens)      # [G, S, D] -> [E, G, C, D]  (sorted blocks: [P*N, 1, b, D])
    expert_out = experts(expert_in, block_expert=dispatcher.block_expert)
    y = dispatcher.combine(expert_out)           # -> [G, S, D]; a token no expert kept gets exactly zero

Paths (the same answer where nothing is dropped; tests/test_moe.py checks each against a naive loop):
  Einsum      dispatch mask and combine weights [G, S, E, C] (the decision's dense()); two einsums
  Index       slot_token, slot_gate [G, E, C] (the decision's slots()); a gather and a scatter-add
  Blocks      dropless: each of the P batch shards sorts its routed choices by expert into N blocks of b slots
              (sorted_blocks); gather, each block through its expert's weights, scatter-add. Nothing dropped.
  EveryToken  dropless where blocks do not pay (a decoding step): every expert computes every token of its
              group, combined by gates [G, S, E] (0: not routed)
  Ragged      dropless by grouped matmuls: each batch shard's routed choices sorted by expert into one run of
              rows per expert ([P, T*K/P, D], no padding), group_sizes [P, E]; the experts multiply each run by
              its expert's weights with jax.lax.ragged_dot (a grouped GEMM on GPUs; no weights gathered)
Both routing decisions (tokens choose, experts choose) convert to the Einsum and Index forms; Blocks,
EveryToken and Ragged take tokens-choose decisions (MoeConfig checks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchx.axes import BATCH, EMBED, EXPERT, EXPERT_GROUP, UNMODELED
from switchx.config import MoeConfig
from switchx.moe.experts import FIXED_LAYOUT_MAX_TOKENS
from switchx.moe.routing import TokenChoice
from switchx.nn.linear import matmul

# Experts sharded over 'expert', groups over 'data': XLA inserts an all-to-all over the expert axis here.
EXPERT_MAJOR = (EXPERT, EXPERT_GROUP, UNMODELED, EMBED)
# Moving one expert weight matrix through memory, in units of one token through that matrix (2*D*F FLOPs):
# 4*D*F bytes at ~10 FLOPs per byte (a CPU's compute / memory bandwidth balance).
WEIGHT_PASS = 20


class Dispatcher(Protocol):
  block_expert: jax.Array | None        # [P*N]: the expert of each block (Blocks only)
  group_sizes: jax.Array | None         # [P, E]: rows of each expert in each shard's sorted run (Ragged only)
  def dispatch(self, tokens: jax.Array) -> jax.Array: ...     # [G, S, D] -> expert inputs
  def combine(self, expert_out: jax.Array) -> jax.Array: ...  # expert outputs -> [G, S, D]


def capacity_and_block(moe: MoeConfig, num_groups: int, group_size: int, train: bool) -> tuple[int, int]:
  """(C, b): the expert capacity, and the dropless block size (0: not sorted blocks)."""
  if moe.dispatch == "ragged":
    return moe.max_slots_per_expert(group_size), 0
  if moe.dispatch != "dropless":
    return moe.capacity(group_size, train=train), 0
  tokens_per_shard = num_groups * group_size // moe.num_group_partitions
  return moe.max_slots_per_expert(group_size), dropless_block_size(tokens_per_shard, moe.top_k, moe.num_experts)


def make_dispatcher(moe: MoeConfig, decision, *, group_size: int, capacity: int, block: int, dtype) -> Dispatcher:
  """The dispatcher of moe.dispatch for one routing decision (tokens [G, S, D], S = group_size)."""
  num_experts = moe.num_experts
  if moe.dispatch == "ragged":
    return Ragged.sort(decision, num_experts, moe.num_group_partitions, dtype)
  if block:
    return Blocks.sort(decision, num_experts, block, moe.num_group_partitions, dtype)
  if moe.dispatch == "dropless":
    return EveryToken.of(decision, num_experts, dtype)
  if moe.dispatch == "einsum":
    return Einsum(*decision.dense(num_experts, capacity), dtype)
  return Index(*decision.slots(num_experts, capacity), group_size, dtype)


def _expert_major(x: jax.Array) -> jax.Array:
  return nn.with_logical_constraint(x, EXPERT_MAJOR)


@dataclasses.dataclass(frozen=True)
class Einsum:
  dispatch_mask: jax.Array     # [G, S, E, C] bool
  combine_weights: jax.Array   # [G, S, E, C] float32
  dtype: Any
  block_expert = None
  group_sizes = None

  def dispatch(self, tokens):
    # Group-major dots, transposed outside: XLA's CPU backend rejects bf16 x bf16 -> f32 dots whose batch
    # dimension is not leading, and autodiff of an 'egcd' output produces exactly those.
    expert_in = matmul("gsec,gsd->gecd", self.dispatch_mask, tokens, self.dtype)            # [G, E, C, D]
    return _expert_major(jnp.swapaxes(expert_in, 0, 1))                                     # [E, G, C, D]

  def combine(self, expert_out):
    expert_out = jnp.swapaxes(_expert_major(expert_out), 0, 1)                              # [G, E, C, D]
    return matmul("gsec,gecd->gsd", self.combine_weights, expert_out, self.dtype)          # [G, S, D]


@dataclasses.dataclass(frozen=True)
class Index:
  slot_token: jax.Array        # [G, E, C] int32: the token in each slot; S marks an empty slot
  slot_gate: jax.Array         # [G, E, C] float32
  group_size: int              # S
  dtype: Any
  block_expert = None
  group_sizes = None

  def dispatch(self, tokens):
    padded = jnp.pad(tokens, ((0, 0), (0, 1), (0, 0)))                     # [G, S+1, D]; row S: empty slot
    expert_in = jax.vmap(lambda rows, idx: rows[idx])(padded, self.slot_token)  # [G, E, C, D]
    return _expert_major(jnp.swapaxes(expert_in, 0, 1))                    # [E, G, C, D]

  def combine(self, expert_out):
    weighted = jnp.swapaxes(_expert_major(expert_out), 0, 1).astype(jnp.float32) * self.slot_gate[..., None]
    y = jax.vmap(_scatter_add, in_axes=(0, 0, None))(self.slot_token, weighted, self.group_size)  # [G, S, D]
    return y.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class EveryToken:
  gates: jax.Array             # [G, S, E] float32: each token's gate per expert, 0 where not routed
  dtype: Any
  block_expert = None
  group_sizes = None

  @classmethod
  def of(cls, decision: TokenChoice, num_experts: int, dtype) -> "EveryToken":
    chosen = jax.nn.one_hot(decision.expert_index, num_experts, dtype=jnp.float32)        # [G, S, K, E]
    return cls(jnp.einsum("gske,gsk->gse", chosen, jnp.where(decision.routed, decision.gate, 0.0)), dtype)

  def dispatch(self, tokens):
    num_experts = self.gates.shape[-1]
    return _expert_major(jnp.broadcast_to(tokens[None], (num_experts,) + tokens.shape))  # [E, G, S, D]

  def combine(self, expert_out):
    expert_out = _expert_major(expert_out).astype(jnp.float32)                            # [E, G, S, D]
    return jnp.einsum("gse,egsd->gsd", self.gates, expert_out).astype(self.dtype)         # [G, S, D]


@dataclasses.dataclass(frozen=True)
class Ragged:
  slot_token: jax.Array        # [P, M] int32 (M = G*S*K/P): index into the shard's G*S/P tokens; G*S/P = empty
  slot_gate: jax.Array         # [P, M] float32
  group_sizes: jax.Array       # [P, E] int32: expert e's rows follow expert e-1's; unrouted choices come last
  num_groups: int              # G
  shard_tokens: int            # G*S/P
  dtype: Any
  block_expert = None

  @classmethod
  def sort(cls, decision: TokenChoice, num_experts: int, parts: int, dtype) -> "Ragged":
    """Each of the P batch shards sorts its own G/P groups' choices: no token crosses shards."""
    shards = jax.tree_util.tree_map(lambda a: a.reshape((parts, -1) + a.shape[1:]), decision)
    slot_token, slot_gate, group_sizes = jax.vmap(lambda d: sorted_rows(d, num_experts))(shards)
    num_groups, group_size = decision.expert_index.shape[:2]
    return cls(slot_token, slot_gate, group_sizes, num_groups, num_groups * group_size // parts, dtype)

  def dispatch(self, tokens):
    parts, d_model = self.slot_token.shape[0], tokens.shape[-1]
    flat = jnp.pad(tokens.reshape(parts, -1, d_model), ((0, 0), (0, 1), (0, 0)))  # [P, G*S/P+1, D]; +1: empty
    expert_in = jax.vmap(lambda rows, idx: rows[idx])(flat, self.slot_token)     # [P, M, D]
    return nn.with_logical_constraint(expert_in, (BATCH, None, EMBED))[:, None]  # [P, 1, M, D]

  def combine(self, expert_out):
    weighted = expert_out[:, 0].astype(jnp.float32) * self.slot_gate[..., None]   # [P, M, D]
    weighted = nn.with_logical_constraint(weighted, (BATCH, None, EMBED))
    y = jax.vmap(_scatter_add, in_axes=(0, 0, None))(self.slot_token, weighted, self.shard_tokens)  # [P, G*S/P, D]
    return y.reshape(self.num_groups, -1, y.shape[-1]).astype(self.dtype)          # [G, S, D]


def sorted_rows(decision: TokenChoice, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Every routed choice sorted by expert (stable: sequence order within an expert), unrouted ones last.
  -> slot_token [T*K] (index into the T = G*S tokens; T = empty), slot_gate [T*K], group_sizes [E]."""
  num_groups, group_size, k = decision.expert_index.shape
  num_tokens = num_groups * group_size
  expert = jnp.where(decision.routed, decision.expert_index, num_experts).reshape(-1)   # [T*K], E: unrouted
  order = jnp.argsort(expert, stable=True).astype(jnp.int32)                          # [T*K]
  group_sizes = jnp.zeros(num_experts + 1, jnp.int32).at[expert].add(1)[:num_experts]  # [E]
  filled = expert[order] < num_experts
  slot_token = jnp.where(filled, order // k, num_tokens)
  slot_gate = jnp.where(filled, decision.gate.reshape(-1)[order], 0.0)
  return slot_token, slot_gate, group_sizes


@dataclasses.dataclass(frozen=True)
class Blocks:
  slot_token: jax.Array        # [P, N, b] int32: index into the shard's G*S/P tokens; G*S/P = empty slot
  slot_gate: jax.Array         # [P, N, b] float32
  block_expert: jax.Array      # [P*N] int32
  num_groups: int              # G
  shard_tokens: int            # G*S/P
  dtype: Any
  group_sizes = None

  @classmethod
  def sort(cls, decision: TokenChoice, num_experts: int, block: int, parts: int, dtype) -> "Blocks":
    """Each of the P batch shards sorts its own G/P groups' choices: no token crosses shards."""
    shards = jax.tree_util.tree_map(lambda a: a.reshape((parts, -1) + a.shape[1:]), decision)
    slot_token, slot_gate, block_expert = jax.vmap(lambda d: sorted_blocks(d, num_experts, block))(shards)
    num_groups, group_size = decision.expert_index.shape[:2]
    return cls(slot_token, slot_gate, block_expert.reshape(-1), num_groups, num_groups * group_size // parts, dtype)

  def dispatch(self, tokens):
    parts, d_model = self.slot_token.shape[0], tokens.shape[-1]
    flat = jnp.pad(tokens.reshape(parts, -1, d_model), ((0, 0), (0, 1), (0, 0)))  # [P, G*S/P+1, D]; +1: empty
    expert_in = jax.vmap(lambda rows, idx: rows[idx])(flat, self.slot_token)     # [P, N, b, D]
    expert_in = nn.with_logical_constraint(expert_in, (BATCH, None, None, EMBED))
    return expert_in.reshape((-1, 1) + expert_in.shape[2:])                     # [P*N, 1, b, D]

  def combine(self, expert_out):
    d_model = expert_out.shape[-1]
    weighted = expert_out.reshape(self.slot_gate.shape + (d_model,)).astype(jnp.float32)
    weighted = nn.with_logical_constraint(weighted * self.slot_gate[..., None], (BATCH, None, None, EMBED))
    y = jax.vmap(_scatter_add, in_axes=(0, 0, None))(self.slot_token, weighted, self.shard_tokens)  # [P, G*S/P, D]
    return y.reshape(self.num_groups, -1, d_model).astype(self.dtype)          # [G, S, D]


def _scatter_add(index, rows, size):
  """rows [..., D] added at `index` into size + 1 rows of zeros; the last row (empty slots) is cut off."""
  return jnp.zeros((size + 1, rows.shape[-1]), jnp.float32).at[index].add(rows)[:size]


def dropless_block_size(num_tokens: int, top_k: int, num_experts: int) -> int:
  """Block size b of the dropless layout for `num_tokens` tokens with `top_k` choices each, or 0 to have every
  expert compute every token of its group instead (which drops nothing either).

  b is the largest power of two <= the mean load (choices per expert), at most FIXED_LAYOUT_MAX_TOKENS, so the
  N blocks hold at most T*K + E*(b-1) < 2*T*K slots. Each block also gathers its expert's weights (read,
  written, read again by the product), so blocks win when tokens are many per expert (an encoder pass) and lose
  when they are few (a decoding step), where the E*T slots read each expert's weights once. Costs in
  token-matrix units: blocks N*b + 3*WEIGHT_PASS*N, slots E*T + WEIGHT_PASS*E.
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


def sorted_blocks(decision: TokenChoice, num_experts: int, block_size: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Every routed choice (capacity ignored: nothing is dropped), sorted by expert into blocks of `block_size`
  slots, each block holding one expert's tokens (its last block padded with empty slots).

  Returns slot_token [N, b] (index into the G*S tokens of all groups, G*S = empty), slot_gate [N, b] and
  block_expert [N]. N is static: sum_e ceil(n_e / b) <= (T*K + E*(b-1)) / b for any loads n_e summing to
  T*K, so the computation costs at most T*K + E*(b-1) token slots however the router splits the tokens
  (fixed-capacity dispatch without drops needs E*T). Unused blocks hold only empty slots.
  """
  num_groups, group_size, k = decision.expert_index.shape
  b, num_choices = block_size, num_groups * group_size * k
  num_blocks = (num_choices + num_experts * (b - 1)) // b
  expert = jnp.where(decision.routed, decision.expert_index, num_experts).reshape(-1)      # [T*K], E: unrouted
  order = jnp.argsort(expert, stable=True)                                                # choices by expert
  load = jnp.zeros(num_experts + 1, jnp.int32).at[expert].add(1)[:num_experts]            # [E] n_e
  blocks = -(-load // b)                                                                   # [E]
  block_end = jnp.cumsum(blocks)                                                           # [E]
  first_slot = (block_end - blocks) * b                                                    # [E]
  first_choice = jnp.cumsum(load) - load                                                   # [E] in `order`
  sorted_expert = expert[order]                                                            # [T*K]
  safe = jnp.minimum(sorted_expert, num_experts - 1)
  slot = first_slot[safe] + jnp.arange(num_choices) - first_choice[safe]                   # [T*K]
  slot = jnp.where(sorted_expert < num_experts, slot, num_blocks * b)                     # unrouted: nowhere
  slot_choice = jnp.full(num_blocks * b, num_choices, jnp.int32).at[slot].set(
      order.astype(jnp.int32), mode="drop")                                                # [N*b]
  filled = slot_choice < num_choices
  slot_token = jnp.where(filled, slot_choice // k, num_groups * group_size)                # [N*b]
  slot_gate = jnp.where(filled, decision.gate.reshape(-1)[jnp.minimum(slot_choice, num_choices - 1)], 0.0)
  block_expert = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(num_blocks), side="right"),
                             num_experts - 1).astype(jnp.int32)                            # [N]
  return slot_token.reshape(num_blocks, b), slot_gate.reshape(num_blocks, b), block_expert

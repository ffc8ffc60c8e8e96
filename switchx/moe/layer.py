"""The sparse feed-forward layer: group -> route -> dispatch -> experts -> combine, plus its losses and metrics.

Legend: B batch, L length, T = B*L tokens, G groups, S tokens per group (G*S = T), E experts,
C capacity (slots per expert per group), K experts per token, D d_model, F expert d_ff.

    x [B, L, D] -> tokens [G, S, D]                  group_shape (below)
    routing = Router(tokens)                         moe/routing.py: float32 logits [G, S, E], a decision
                                                     (route_by="task": logits from each token's task id)
    expert_in = dispatcher.dispatch(tokens)          moe/dispatch.py: [E, G, C, D] (einsum, index, dropless, ragged)
    expert_out = Experts(expert_in)                  moe/experts.py: [E, G, C, D] (NLLB: masked; eval: x (1 - p))
    y = dispatcher.combine(expert_out) -> [B, L, D]  a token with no expert slot gets exactly zero (the
                                                     residual carries it)
    y += sigmoid(x . g) * shared_expert(x)           only with MoeConfig.shared_expert_d_ff (Qwen-MoE)
    aux = router_stats(...)                          losses and metrics over real tokens
    sow("balance", load [E])                         bias balancing only: the choices per expert, from which
                                                     the train step moves the router's selection bias

MoeConfig.semantics="transformers" reproduces transformers' SwitchTransformers: G = B and S = L (one group per
sequence), C = expert_capacity, every token routed (padding too), so the metrics count every token. Its model-level
losses come from losses.transformers_router_losses (docs/interop.md).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchx.axes import BATCH, EMBED, UNMODELED
from switchx.config import DecoderOnlyConfig, ModelConfig, MoeConfig
from switchx.moe.dispatch import capacity_and_block, make_dispatcher
from switchx.moe.experts import Experts
from switchx.moe.routing import ExpertChoice, Router, TokenChoice
from switchx.nn.linear import DenseGeneral
from switchx.nn.mlp import MlpBlock


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


class MoeLayer(nn.Module):
  """A routed feed-forward layer. Returns (y [B, L, D], aux) where aux holds this layer's losses/metrics."""

  moe: MoeConfig
  d_ff: int                               # each expert's hidden size
  activation: str = "relu"
  dropout_rate: float = 0.0               # inside the experts
  init_scale: float = 1.0
  dtype: str = "float32"                  # the model's activation dtype
  use_bias: bool = False                  # biases in the experts (and the shared expert)

  @classmethod
  def for_model(cls, config: ModelConfig | DecoderOnlyConfig, **kwargs) -> "MoeLayer":
    return cls(config.moe, config.expert_d_ff, config.activation, config.expert_dropout_rate, config.init_scale,
               config.dtype, getattr(config, "use_bias", False), **kwargs)

  def setup(self):
    self.route = Router(self.moe)
    nn.share_scope(self, self.route)       # the router's kernel is this layer's parameter "router"
    self.experts = Experts(self.moe.num_experts, self.d_ff, self.activation, self.dropout_rate, self.init_scale,
                           jnp.dtype(self.dtype), self.moe.expert_dtype, self.use_bias)
    self.output_dropout = nn.Dropout(self.moe.expert_output_dropout)
    if self.moe.shared_expert_d_ff:
      self.shared_expert = MlpBlock(self.moe.shared_expert_d_ff, self.activation, self.dropout_rate,
                                    self.init_scale, jnp.dtype(self.dtype), self.use_bias)
      if self.moe.shared_expert_gate:
        self.shared_expert_gate = DenseGeneral(1, (EMBED, UNMODELED), init_scale=self.init_scale)

  def __call__(self, x: jax.Array, token_mask: jax.Array, train: bool,
               task_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """x [B, L, D], token_mask [B, L] (False: padding, never routed); task_ids [B] or [B, L] int (route_by="task"
    only: each row's or each token's task; a one-task model needs none)."""
    moe, dtype = self.moe, jnp.dtype(self.dtype)
    batch, length, d_model = x.shape
    if moe.semantics == "transformers":  # transformers' SparseMLP: a group per sequence, every token routed
      (num_groups, group_size), token_mask = (batch, length), jnp.ones((batch, length), bool)
    else:
      num_groups, group_size = group_shape(batch * length, moe.group_size, moe.num_group_partitions)
    capacity, block = capacity_and_block(moe, num_groups, group_size, train)
    tokens = x.reshape(num_groups, group_size, d_model)                        # [G, S, D]
    tokens = nn.with_logical_constraint(tokens, (BATCH, UNMODELED, EMBED))
    mask = token_mask.reshape(num_groups, group_size).astype(bool)             # [G, S]

    tasks = _task_ids(moe, task_ids, num_groups, group_size, self.is_initializing())   # [G, S] or None
    routing = self.route(tokens, mask, capacity, train, tasks)                 # float32 ("selective precision")
    dispatcher = make_dispatcher(moe, routing.decision, group_size=group_size, capacity=capacity, block=block,
                                 dtype=dtype)
    expert_in = dispatcher.dispatch(tokens)                                    # [E, G, C, D] (blocks: [N, 1, b, D])
    self.sow("intermediates", "expert_inputs", expert_in)
    expert_out = self.experts(expert_in, not train, dispatcher.block_expert, dispatcher.group_sizes)  # same shape
    if moe.expert_output_dropout and train:                                    # NLLB's expert output masking
      expert_out = self.output_dropout(expert_out, deterministic=False)
    y = dispatcher.combine(expert_out)                                         # [G, S, D]
    if moe.expert_output_dropout and not train:                                # its eval-time counterpart
      y = (y * (1.0 - moe.expert_output_dropout)).astype(y.dtype)
    y = nn.with_logical_constraint(y, (BATCH, UNMODELED, EMBED)).reshape(batch, length, d_model)
    if moe.shared_expert_d_ff:                                                 # beside the routed experts
      y = y + self.shared(x, train)

    probs = routing.probs                                                      # [G, S, E]
    if moe.expert_map is not None:  # merged experts: a merged expert's probability is its columns' sum
      probs = probs @ jax.nn.one_hot(jnp.asarray(moe.expert_map), moe.num_experts, dtype=probs.dtype)
    aux = router_stats(routing.logits, probs, mask, routing.decision, moe.num_experts, moe.balance_loss_scope,
                       length)
    if routing.selection_bias is not None:                                     # bias balancing
      aux["router_bias"] = routing.selection_bias                              # [E]
      if train:  # this step's choices per expert, for the update the train step makes (train/step.py)
        chosen = jax.nn.one_hot(routing.decision.expert_index, moe.num_experts) * mask[..., None, None]
        self.sow("balance", "router_bias", chosen.sum((0, 1, 2)))             # [E]
    aux["capacity"] = jnp.asarray(capacity, jnp.int32)
    aux["group_size"] = jnp.asarray(group_size, jnp.int32)
    if moe.semantics == "transformers":  # per sequence, what losses.transformers_router_losses combines
      aux["argmax_fraction"] = jax.nn.one_hot(jnp.argmax(routing.logits, -1), moe.num_experts).mean(1)  # [B, E]
      aux["mean_router_prob"] = routing.probs.mean(1)                                                   # [B, E]
    return y, aux

  def shared(self, x: jax.Array, train: bool) -> jax.Array:
    """The shared expert (Qwen-MoE): a dense FFN every token passes through, its output scaled by a sigmoid
    gate of the token when MoeConfig.shared_expert_gate. x [B, L, D] -> [B, L, D]."""
    out = self.shared_expert(x, deterministic=not train)                      # [B, L, D]
    if self.moe.shared_expert_gate:
      gate = self.shared_expert_gate(x.astype(jnp.float32))                   # [B, L, 1] float32
      out = (jax.nn.sigmoid(gate) * out.astype(jnp.float32)).astype(out.dtype)
    return out


def _task_ids(moe: MoeConfig, task_ids: jax.Array | None, num_groups: int, group_size: int,
              initializing: bool) -> jax.Array | None:
  """Each token's task id [G, S] int32 (route_by="task") from per-row [B] or per-token [B, L] ids, else None.
  A one-task model (e.g. an extracted sub-network) reads row 0 whatever ids come, as does initialisation, whose
  shapes do not depend on them."""
  if moe.route_by != "task":
    return None
  if moe.num_tasks == 1 or (task_ids is None and initializing):
    return jnp.zeros((num_groups, group_size), jnp.int32)
  if task_ids is None:
    raise ValueError(f"MoeConfig.route_by='task' with {moe.num_tasks} tasks: the model needs each example's task "
                     "id (encoder_task_ids / decoder_task_ids, which data.tasks.Mixture batches carry, or "
                     "task_ids=... to generate).")
  task_ids = jnp.asarray(task_ids, jnp.int32)
  if task_ids.ndim == 1:                                                     # one id per row: every token of it
    task_ids = jnp.broadcast_to(task_ids[:, None], (len(task_ids), num_groups * group_size // len(task_ids)))
  return task_ids.reshape(num_groups, group_size)                            # [B, L] -> [G, S], as the tokens


def balance_loss(chosen: jax.Array, probs: jax.Array, real: jax.Array) -> jax.Array:
  """E * sum_e f_e * P_e in each unit (f_e: share of the unit's real tokens' choices that pick e, P_e: their
  mean router probability), averaged over the units with real tokens. chosen, probs [U, T, E]; real [U, T]."""
  unit_real = real.sum(1)                                                    # [U]
  per_token = 1.0 / jnp.maximum(unit_real, 1.0)[:, None]
  fraction = (chosen * real[..., None]).sum(1) * per_token                  # [U, E] f_e
  mean_prob = (probs * real[..., None]).sum(1) * per_token                  # [U, E] P_e
  per_unit = probs.shape[-1] * (fraction * mean_prob).sum(-1)               # [U]
  has_real = (unit_real > 0).astype(jnp.float32)
  return (per_unit * has_real).sum() / jnp.maximum(has_real.sum(), 1.0)


def router_stats(logits: jax.Array, probs: jax.Array, mask: jax.Array, decision: TokenChoice | ExpertChoice,
                 num_experts: int, balance_scope: str = "group", sequence_length: int = 0) -> dict[str, jax.Array]:
  """Losses and metrics of one layer, over real (unmasked) tokens only.

  load_balance_loss: E * sum_e f_e * P_e (f_e: fraction of tokens choosing e before capacity, over all K
    choices; P_e: mean router probability), per routing group and averaged over groups (balance_scope "group",
    Switch), per sequence of `sequence_length` tokens ("sequence"), or once over the whole batch ("global": under
    a mesh the sums run over every device's tokens). Uniform routing gives K.
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
    units = {"group": mask.shape, "sequence": (-1, sequence_length), "global": (1, -1)}[balance_scope]
    as_units = lambda a: a.reshape(units + a.shape[2:])                     # [U, T, ...]
    stats["load_balance_loss"] = balance_loss(as_units(chosen), as_units(probs), as_units(real))
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
  usage = stats["expert_usage"]                                              # [E], sums to 1
  stats["load_cv"] = jnp.std(usage) / jnp.maximum(jnp.mean(usage), 1e-9)     # 0: perfectly even
  stats["max_mean_load"] = jnp.max(usage) / jnp.maximum(jnp.mean(usage), 1e-9)  # 1: even; E: one expert
  stats["idle_experts"] = jnp.sum(usage == 0).astype(jnp.float32)           # experts no token chose here
  return stats

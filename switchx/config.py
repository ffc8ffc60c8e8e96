"""Model configuration: frozen dataclasses, validated at construction.

Gin binds these at the edges (configs/*.gin through switchx.gin_config); nothing inside the model reads gin.
Every check raises a ValueError that names the offending field and says how to fix it, so a bad config fails
before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

ACTIVATIONS = ("relu", "gelu", "silu", "gated-relu", "gated-gelu", "gated-silu")
DTYPES = ("float32", "bfloat16")
ROUTERS = ("tokens_choose", "experts_choose")
# What the router reads: each token's own input ("token", Switch), or the task id of the example the token belongs
# to ("task": task-level MoE, Kudugunta et al. 2021, arXiv 2110.03742; every token of a task takes the same experts,
# so a task's sub-network can be extracted, switchx/extract.py).
ROUTE_BY = ("token", "task")
SECOND_EXPERT_POLICIES = ("all", "random")
DISPATCH = ("einsum", "index", "dropless", "ragged")
# "switch": the original Switch / t5x routing (groups of up to group_size tokens across the batch, capacity from
# the factors, padding never routed, per-layer losses). "transformers": Hugging Face transformers'
# SwitchTransformers (one group per sequence, fixed expert_capacity, padding routed, its router losses over a
# stack's concatenated router logits). See docs/interop.md.
SEMANTICS = ("switch", "transformers")
BALANCE_SCOPES = ("group", "sequence", "global")
EXPERT_DTYPES = ("auto", "float32", "bfloat16")
QK_NORMS = ("none", "head", "full")
POSITION_EMBEDDINGS = ("relative", "sinusoidal")   # T5's learned relative bias; fairseq's fixed sinusoids (NLLB)
NORMS = ("rms", "layer")                             # T5's RMSNorm; LayerNorm with a bias (NLLB, fairseq)

# A sparse layout says which feed-forward positions of a stack are MoE layers:
#   "none" | "all" | "every:N" (layer i sparse when i % N == N - 1, the original Switch placement)
#   | an explicit tuple of layer indices.
SparseLayout = Union[str, Sequence[int]]


def _fail(owner: str, field: str, value, why: str) -> None:
  raise ValueError(f"{owner}.{field}={value!r}: {why}")


def sparse_layers(layout: SparseLayout, num_layers: int, field: str = "sparse layout") -> tuple[int, ...]:
  """Indices of the sparse (MoE) feed-forward layers in a stack of `num_layers`."""
  if isinstance(layout, str):
    if layout == "none":
      return ()
    if layout == "all":
      return tuple(range(num_layers))
    if layout.startswith("every:"):
      try:
        n = int(layout.split(":", 1)[1])
      except ValueError:
        n = 0
      if n < 1:
        _fail("ModelConfig", field, layout, "'every:N' needs a whole number N >= 1, e.g. 'every:2'.")
      return tuple(i for i in range(num_layers) if i % n == n - 1)
    _fail("ModelConfig", field, layout,
          "expected 'none', 'all', 'every:N' or a tuple of layer indices.")
  indices = tuple(int(i) for i in layout)
  bad = [i for i in indices if not 0 <= i < num_layers]
  if bad:
    _fail("ModelConfig", field, layout, f"layer indices {bad} are outside 0..{num_layers - 1}.")
  if len(set(indices)) != len(indices):
    _fail("ModelConfig", field, layout, "a layer index is listed twice.")
  return tuple(sorted(indices))


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """The sparse feed-forward layer: router, capacity, dispatch, experts and their losses."""

  num_experts: int = 8
  router: str = "tokens_choose"          # "tokens_choose" (Switch top-1, GShard top-2) or "experts_choose"
  top_k: int = 1                         # experts per token (tokens_choose)
  second_expert_policy: str = "all"      # "all" or "random" (GShard: keep with prob min(1, g2 / threshold))
  second_expert_threshold: float = 0.2
  normalize_gates: bool = False          # renormalise the chosen experts' gates to sum to 1 (GShard top-2)
  batch_prioritized: bool = False        # priority by router confidence instead of sequence order
  group_size: int = 4096                 # maximum tokens per routing group (see moe.layer.group_shape)
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0      # <= 0: no token is ever dropped
  min_capacity: int = 4
  expert_capacity: int | None = None     # a fixed capacity that overrides the factors (transformers' style)
  jitter_noise: float = 0.0              # multiplicative uniform noise on the router input, training only
  dispatch: str = "einsum"               # "einsum" (one-hot masks), "index" (gather / scatter), "dropless"
                                         # (no capacity: tokens sorted by expert into blocks; tokens_choose) or
                                         # "ragged" (no capacity: grouped matmuls, jax.lax.ragged_dot; tokens_choose)
  expert_dropout_rate: float | None = None  # dropout inside experts; None: the model's dropout_rate
  expert_d_ff: int | None = None         # hidden size of each expert; None: the model's d_ff
  expert_dtype: str = "auto"             # the experts' compute dtype; "auto": the model's dtype, but float32
                                         # when training on a CPU with few tokens per expert (see
                                         # moe.experts.expert_compute_dtype); or "float32" / "bfloat16"
  shared_expert_d_ff: int = 0            # > 0: a dense FFN of this size every token also passes through, beside
                                         # the routed experts (Qwen-MoE's shared expert); 0: none
  shared_expert_gate: bool = True        # scale the shared expert's output by sigmoid(x . w_gate), as Qwen-MoE
  expert_map: tuple[int, ...] | None = None  # merged experts (switchx/merge.py): the router keeps len(expert_map)
                                         # columns and column i's tokens go to expert expert_map[i]; None: identity
  routed_scaling_factor: float = 1.0     # multiplies every routed expert's gate (DeepSeek's routed_scaling_factor);
                                         # E undoes top-1's ~1/E gate at uniform routing
  normalize_kept_gates: bool = False     # renormalise the gates of the choices that survived capacity to sum to 1
                                         # (NLLB-MoE / fairseq: a token that lost its 2nd expert keeps gate 1)
  expert_output_dropout: float = 0.0     # NLLB-MoE's expert output masking (moe_token_dropout): dropout on each
                                         # expert's weighted output when training; eval scales it by 1 - rate
  load_balance_loss_coef: float = 0.01
  balance_loss_scope: str = "group"      # where f_e and P_e of the balance loss are counted: each routing group
                                         # (Switch), each sequence (row), or the global batch (over every device)
  bias_balance_rate: float = 0.0         # > 0: auxiliary-loss-free balancing (arXiv 2408.15664, DeepSeek-V3): a
                                         # per-expert bias added to the router log-probabilities to choose experts
                                         # (never to the gates), moved by this much toward the mean load after
                                         # each training step (moe.routing.balance_bias); 0: none
  router_z_loss_coef: float = 0.0
  num_group_partitions: int = 1          # shards the routing groups are split over (the mesh's data x expert
                                         # axes; set by the partitioner): the group count is a multiple of it
  semantics: str = "switch"              # "switch" (original) or "transformers" (HF parity); see SEMANTICS
  route_by: str = "token"                # "token" (each token's input) or "task" (the token's task id: a learned
                                         # [num_tasks, E] table of router logits, parameter "task_router"); all of
                                         # a task's tokens take its k experts, so capacity factors <= 0 (no
                                         # dropping) and load_balance_loss_coef 0 suit it unless tasks are many
  num_tasks: int = 0                     # rows of that table (route_by="task"); task ids are 0 .. num_tasks - 1

  def __post_init__(self):
    own = "MoeConfig"
    if self.semantics not in SEMANTICS:
      _fail(own, "semantics", self.semantics,
            f"choose one of {SEMANTICS}: 'switch' (the original routing, the default) or 'transformers' "
            "(reproduces Hugging Face SwitchTransformers).")
    if self.semantics == "transformers":
      if self.expert_capacity is None:
        _fail(own, "expert_capacity", None,
              "semantics='transformers' routes each sequence with a fixed capacity; set expert_capacity "
              "(transformers' default is 64) or use semantics='switch'.")
      if self.router != "tokens_choose" or self.top_k != 1 or self.batch_prioritized:
        _fail(own, "semantics", self.semantics,
              "transformers' SwitchTransformers routes top-1 in sequence order; use router='tokens_choose', "
              "top_k=1, batch_prioritized=False, or use semantics='switch'.")
    if self.num_experts < 1:
      _fail(own, "num_experts", self.num_experts, "needs at least one expert.")
    if self.router not in ROUTERS:
      _fail(own, "router", self.router, f"unknown router; choose one of {ROUTERS}.")
    if self.top_k < 1:
      _fail(own, "top_k", self.top_k, "each token needs at least one expert.")
    if self.router == "tokens_choose" and (len(self.expert_map) if self.expert_map else self.num_experts) < self.top_k:
      _fail(own, "num_experts", self.num_experts,
            f"fewer experts than top_k={self.top_k}; raise num_experts or lower top_k.")
    if self.second_expert_policy not in SECOND_EXPERT_POLICIES:
      _fail(own, "second_expert_policy", self.second_expert_policy,
            f"choose one of {SECOND_EXPERT_POLICIES}.")
    if not self.second_expert_threshold > 0:
      _fail(own, "second_expert_threshold", self.second_expert_threshold, "must be > 0.")
    if self.group_size < 1:
      _fail(own, "group_size", self.group_size, "must be >= 1 token.")
    if self.min_capacity < 0:
      _fail(own, "min_capacity", self.min_capacity, "must be >= 0.")
    if self.expert_capacity is not None and self.expert_capacity < 1:
      _fail(own, "expert_capacity", self.expert_capacity,
            "gives capacity 0, so every token would be dropped; use None (capacity from the factors) or >= 1.")
    for name in ("train_capacity_factor", "eval_capacity_factor"):
      if not math.isfinite(getattr(self, name)):
        _fail(own, name, getattr(self, name), "must be a finite number (<= 0 means no dropping).")
    if self.jitter_noise < 0 or self.jitter_noise >= 1:
      _fail(own, "jitter_noise", self.jitter_noise, "must be in [0, 1).")
    if self.dispatch not in DISPATCH:
      _fail(own, "dispatch", self.dispatch, f"choose one of {DISPATCH}.")
    if self.dispatch in ("dropless", "ragged") and (self.router != "tokens_choose" or self.semantics != "switch"):
      _fail(own, "dispatch", self.dispatch,
            f"{self.dispatch} dispatch sends every token to its top-k experts (router='tokens_choose', "
            "semantics='switch'); experts_choose and transformers' fixed capacity need 'einsum' or 'index'.")
    if not 0 <= self.expert_output_dropout < 1:
      _fail(own, "expert_output_dropout", self.expert_output_dropout, "must be in [0, 1) (0: none).")
    if self.expert_dropout_rate is not None and not 0 <= self.expert_dropout_rate < 1:
      _fail(own, "expert_dropout_rate", self.expert_dropout_rate, "must be in [0, 1) or None.")
    if self.expert_dtype not in EXPERT_DTYPES:
      _fail(own, "expert_dtype", self.expert_dtype, f"choose one of {EXPERT_DTYPES}.")
    if self.expert_d_ff is not None and self.expert_d_ff < 1:
      _fail(own, "expert_d_ff", self.expert_d_ff, "must be >= 1 or None.")
    if self.num_group_partitions < 1:
      _fail(own, "num_group_partitions", self.num_group_partitions, "must be >= 1.")
    if self.expert_map is not None:
      if isinstance(self.expert_map, list):
        object.__setattr__(self, "expert_map", tuple(self.expert_map))
      if sorted(set(self.expert_map)) != list(range(self.num_experts)):
        _fail(own, "expert_map", self.expert_map, f"must send router columns to every one of the {self.num_experts} "
              "experts and to nothing else (values 0 .. num_experts - 1, each at least once).")
      if self.router != "tokens_choose" or self.semantics != "switch" or self.bias_balance_rate > 0:
        _fail(own, "expert_map", self.expert_map, "merged experts are served by tokens_choose routing under "
              "semantics='switch' without bias balancing.")
    if not (math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0):
      _fail(own, "routed_scaling_factor", self.routed_scaling_factor, "must be a finite number > 0 (1: Switch).")
    if not (math.isfinite(self.bias_balance_rate) and self.bias_balance_rate >= 0):
      _fail(own, "bias_balance_rate", self.bias_balance_rate, "must be a finite number >= 0 (0: no bias balancing).")
    if self.bias_balance_rate > 0 and (self.router != "tokens_choose" or self.semantics != "switch"):
      _fail(own, "bias_balance_rate", self.bias_balance_rate,
            "balances the experts tokens choose (router='tokens_choose', semantics='switch'); experts_choose is "
            "balanced by construction. Set it to 0 or use tokens_choose.")
    if self.balance_loss_scope not in BALANCE_SCOPES:
      _fail(own, "balance_loss_scope", self.balance_loss_scope, f"choose one of {BALANCE_SCOPES}.")
    if self.shared_expert_d_ff < 0:
      _fail(own, "shared_expert_d_ff", self.shared_expert_d_ff, "must be >= 0 (0: no shared expert).")
    if self.route_by not in ROUTE_BY:
      _fail(own, "route_by", self.route_by, f"choose one of {ROUTE_BY}.")
    if self.route_by == "task":
      if self.num_tasks < 1:
        _fail(own, "num_tasks", self.num_tasks, "route_by='task' needs num_tasks >= 1 (the fine-tuning mixture's "
              "task count: task ids are each example's task index in FinetuneConfig.tasks).")
      if self.router != "tokens_choose" or self.semantics != "switch" or self.expert_map is not None:
        _fail(own, "route_by", self.route_by, "task routing picks each task's top-k experts (router="
              "'tokens_choose', semantics='switch', no merged experts' expert_map).")
    elif self.num_tasks:
      _fail(own, "num_tasks", self.num_tasks, "only route_by='task' reads num_tasks; set it to 0 or route by task.")

  @property
  def num_router_experts(self) -> int:
    """The router's columns: num_experts, or more when merged experts share them (expert_map)."""
    return self.num_experts if self.expert_map is None else len(self.expert_map)

  def capacity(self, group_size: int, train: bool) -> int:
    """Expert capacity C for a group of `group_size` tokens.

    C = max(ceil(capacity_factor * k * S / E), min_capacity), capped at max_slots_per_expert(S) (the most an
    expert can be sent: S tokens, each once, or more often where merged experts share router columns). A
    capacity factor <= 0 means no token is ever dropped: C = that cap.
    """
    k = self.top_k if self.router == "tokens_choose" else 1
    cap = self.max_slots_per_expert(group_size)
    if self.expert_capacity is not None:
      return min(self.expert_capacity, cap)
    factor = self.train_capacity_factor if train else self.eval_capacity_factor
    if factor <= 0:
      return cap
    c = max(math.ceil(factor * k * group_size / self.num_experts), self.min_capacity)
    return max(1, min(c, cap))

  def max_slots_per_expert(self, group_size: int) -> int:
    """S, or S x min(k, the most router columns mapped to one expert) with merged experts (expert_map): a token
    whose top-k choices are columns of the same merged expert is sent to it once per choice."""
    if self.expert_map is None:
      return group_size
    shared = max(self.expert_map.count(e) for e in set(self.expert_map))
    return group_size * min(self.top_k, shared)


class _WithExperts:
  """What the MoE layer reads from a model config beside its MoeConfig (MoeLayer.for_model)."""

  @property
  def expert_dropout_rate(self) -> float:
    rate = self.moe.expert_dropout_rate
    return self.dropout_rate if rate is None else rate

  @property
  def expert_d_ff(self) -> int:
    return self.moe.expert_d_ff or self.d_ff

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ModelConfig(_WithExperts):
  """A T5 v1.1 encoder-decoder; some feed-forward layers may be MoE layers (see `moe` and *_sparse)."""

  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 6
  head_dim: int | None = 64              # None: d_model // num_heads (must divide)
  d_ff: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  activation: str = "gated-gelu"
  dropout_rate: float = 0.0
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  logits_via_embedding: bool = False     # tied output logits (scaled by d_model ** -0.5) or a separate dense
  rescale_tied_logits: bool = True       # tied logits: scale the decoder output by d_model ** -0.5 (T5; NLLB: no)
  position_embedding: str = "relative"   # "relative" (T5's learned bias) or "sinusoidal" (fairseq's fixed table,
                                         # added to the embeddings: position p reads row p + 2, as M2M100 / NLLB)
  norm: str = "rms"                      # "rms" (T5) or "layer" (LayerNorm with a bias: NLLB)
  use_bias: bool = False                 # biases on attention projections, FFNs and experts (NLLB; T5: none)
  scale_embeddings: bool = False         # multiply token embeddings by sqrt(d_model) (fairseq / NLLB)
  init_scale: float = 0.1                # truncated normal, std = sqrt(init_scale / fan_in)
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"                 # activation dtype; parameters are always float32
  encoder_sparse: SparseLayout = "none"
  decoder_sparse: SparseLayout = "none"
  moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)

  def __post_init__(self):
    own = "ModelConfig"
    for name in ("vocab_size", "d_model", "num_heads", "d_ff", "relative_attention_num_buckets",
                 "relative_attention_max_distance"):
      if getattr(self, name) < 1:
        _fail(own, name, getattr(self, name), "must be >= 1.")
    for name in ("num_encoder_layers", "num_decoder_layers"):
      if getattr(self, name) < 0:
        _fail(own, name, getattr(self, name), "must be >= 0.")
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        _fail(own, "num_heads", self.num_heads,
              f"does not divide d_model={self.d_model}, so head_dim cannot be inferred; "
              "set head_dim explicitly or pick num_heads dividing d_model.")
    elif self.head_dim < 1:
      _fail(own, "head_dim", self.head_dim, "must be >= 1 (or None to use d_model // num_heads).")
    if self.activation not in ACTIVATIONS:
      _fail(own, "activation", self.activation, f"unknown activation; choose one of {ACTIVATIONS}.")
    if self.position_embedding not in POSITION_EMBEDDINGS:
      _fail(own, "position_embedding", self.position_embedding, f"choose one of {POSITION_EMBEDDINGS}.")
    if self.position_embedding == "sinusoidal" and self.d_model < 4:
      _fail(own, "d_model", self.d_model, "sinusoidal positions need d_model >= 4 (two or more frequencies).")
    if self.norm not in NORMS:
      _fail(own, "norm", self.norm, f"choose one of {NORMS}.")
    if self.dtype not in DTYPES:
      _fail(own, "dtype", self.dtype, f"choose one of {DTYPES}.")
    if not 0 <= self.dropout_rate < 1:
      _fail(own, "dropout_rate", self.dropout_rate, "must be in [0, 1).")
    if not self.init_scale > 0:
      _fail(own, "init_scale", self.init_scale, "must be > 0.")
    if not isinstance(self.moe, MoeConfig):
      _fail(own, "moe", self.moe, "must be a MoeConfig.")
    # Normalise explicit layouts to tuples (hashable, so the frozen config stays usable as a jit static).
    for name in ("encoder_sparse", "decoder_sparse"):
      layout = getattr(self, name)
      if not isinstance(layout, str):
        object.__setattr__(self, name, tuple(int(i) for i in layout))
    enc = sparse_layers(self.encoder_sparse, self.num_encoder_layers, "encoder_sparse")
    dec = sparse_layers(self.decoder_sparse, self.num_decoder_layers, "decoder_sparse")
    if dec and self.moe.router == "experts_choose":
      _fail("MoeConfig", "router", self.moe.router,
            "experts-choose routing lets a token's routing depend on later tokens, which breaks the decoder's "
            "causality; use it in the encoder only (decoder_sparse='none') or use 'tokens_choose'.")
    if dec and self.moe.batch_prioritized:
      _fail("MoeConfig", "batch_prioritized", True,
            "batch-prioritized routing orders tokens by router confidence across the sequence, which breaks "
            "the decoder's causality; disable it or keep the decoder dense (decoder_sparse='none').")
    if (enc or dec) and self.moe.router == "tokens_choose" and self.moe.num_router_experts < self.moe.top_k:
      _fail("MoeConfig", "num_experts", self.moe.num_experts, f"fewer experts than top_k={self.moe.top_k}.")

  # Derived sizes -------------------------------------------------------------------------------------------
  @property
  def kv_dim(self) -> int:
    """Per-head dimension."""
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def encoder_sparse_layers(self) -> tuple[int, ...]:
    return sparse_layers(self.encoder_sparse, self.num_encoder_layers, "encoder_sparse")

  @property
  def decoder_sparse_layers(self) -> tuple[int, ...]:
    return sparse_layers(self.decoder_sparse, self.num_decoder_layers, "decoder_sparse")

  @property
  def is_sparse(self) -> bool:
    return bool(self.encoder_sparse_layers or self.decoder_sparse_layers)



@dataclasses.dataclass(frozen=True)
class DecoderOnlyConfig(_WithExperts):
  """A decoder-only (causal) language model as Mixtral, OLMoE and Qwen-MoE build them (models/decoder_only.py):
  pre-norm RMSNorm, rotary positions, grouped-query attention, gated (SwiGLU) feed-forward layers, the layers in
  `sparse` replaced by the same MoE layer as the encoder-decoder's (MoeConfig)."""

  vocab_size: int = 32000
  d_model: int = 512
  num_layers: int = 8
  num_heads: int = 8
  num_kv_heads: int = 8                  # key/value heads; < num_heads: grouped-query attention (must divide it)
  head_dim: int | None = None            # None: d_model // num_heads
  d_ff: int = 1408                       # the dense FFN's hidden size (and each expert's unless moe.expert_d_ff)
  activation: str = "gated-silu"         # SwiGLU
  rope_theta: float = 10000.0
  norm_epsilon: float = 1e-5
  tie_embeddings: bool = False           # output logits from the token embedding (unscaled, as transformers)
  qk_norm: str = "none"                  # RMSNorm on queries / keys: "head" (Qwen3), "full" (OLMoE) or "none"
  qkv_bias: bool = False                 # biases on the query / key / value projections (Qwen1.5-MoE)
  dropout_rate: float = 0.0
  init_scale: float = 1.0                # truncated normal, std = sqrt(init_scale / fan_in)
  dtype: str = "float32"                 # activation dtype; parameters are always float32
  sparse: SparseLayout = "all"           # which layers' FFN is a MoE layer (see sparse_layers)
  moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)

  def __post_init__(self):
    own = "DecoderOnlyConfig"
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff"):
      if getattr(self, name) < 1:
        _fail(own, name, getattr(self, name), "must be >= 1.")
    if self.num_heads % self.num_kv_heads:
      _fail(own, "num_kv_heads", self.num_kv_heads,
            f"each key/value head serves a whole group of query heads: it must divide num_heads={self.num_heads}.")
    if self.head_dim is None and self.d_model % self.num_heads:
      _fail(own, "head_dim", None, f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; set "
            "head_dim explicitly.")
    if self.kv_dim % 2:
      _fail(own, "head_dim", self.kv_dim, "rotary positions rotate pairs of features: it must be even.")
    if self.activation not in ACTIVATIONS:
      _fail(own, "activation", self.activation, f"choose one of {ACTIVATIONS}.")
    if self.dtype not in DTYPES:
      _fail(own, "dtype", self.dtype, f"choose one of {DTYPES}.")
    if self.qk_norm not in QK_NORMS:
      _fail(own, "qk_norm", self.qk_norm, f"choose one of {QK_NORMS}.")
    if self.moe.route_by != "token":
      _fail(own, "moe", f"MoeConfig(route_by={self.moe.route_by!r})", "task routing serves the encoder-decoder's "
            "fine-tuning mixtures (task ids per example); a decoder-only model routes by token.")
    if not self.rope_theta > 0:
      _fail(own, "rope_theta", self.rope_theta, "must be > 0 (10000 for Llama / Mixtral-8x7B).")
    if not 0 <= self.dropout_rate < 1:
      _fail(own, "dropout_rate", self.dropout_rate, "must be in [0, 1).")
    if not isinstance(self.moe, MoeConfig):
      _fail(own, "moe", self.moe, "must be a MoeConfig.")
    if self.sparse_layers:
      if self.moe.router == "experts_choose":
        _fail("MoeConfig", "router", self.moe.router, "expert-choice routing lets a token's routing depend on "
              "later tokens, which breaks a causal model; use tokens_choose.")
      if self.moe.batch_prioritized:
        _fail("MoeConfig", "batch_prioritized", True, "orders tokens by router confidence across the sequence, "
              "which breaks causality; disable it.")

  @property
  def kv_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def sparse_layers(self) -> tuple[int, ...]:
    return sparse_layers(self.sparse, self.num_layers, "sparse")

  @property
  def is_sparse(self) -> bool:
    return bool(self.sparse_layers)



def check_vocab(config: ModelConfig, max_token_id: int, source: str = "the inputs") -> None:
  """Fails early when the tokens fed to the model do not fit its vocabulary."""
  if max_token_id >= config.vocab_size:
    _fail("ModelConfig", "vocab_size", config.vocab_size,
          f"{source} contain token id {max_token_id}; raise vocab_size to at least {max_token_id + 1} "
          "(or use the tokenizer the model was built for).")


OPTIMIZERS = ("adafactor", "adamw")
# bfloat16 Adam moments round stochastically when stored (train/optim.round_stochastically), so the second moment
# stays unbiased, but each store adds noise of up to one bfloat16 step that its EMA averages over ~1/(1 - b2)
# steps: relative spread 1.2% at b2 = 0.98 and 5.2% at 0.999 in a simulation, growing as 1/sqrt(1 - b2) beyond.
BF16_MIN_MOMENT_STEP = 1e-3
SCHEDULES = ("constant", "constant_then_rsqrt", "warmup_cosine")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and the training loop. Defaults follow the Switch / T5 pretraining recipe."""

  optimizer: str = "adafactor"            # T5's Adafactor (factored, decay 0.8, clipping 1.0) or "adamw"
  learning_rate: float = 0.01
  schedule: str = "constant_then_rsqrt"   # lr * sqrt(warmup / max(step, warmup)): 0.01 then 1/sqrt(step)
  warmup_steps: int = 10_000
  num_train_steps: int = 100_000
  end_learning_rate_fraction: float = 0.0  # warmup_cosine decays to lr * this
  weight_decay: float = 0.0                # adamw (decoupled)
  adam_b1: float = 0.9
  adam_b2: float = 0.98
  adam_moments_dtype: str = "float32"     # adamw: "bfloat16" stores both moments in 2 bytes (12 -> 8 B/param)
  grad_clip_norm: float = 0.0              # adamw: clip the global gradient norm when > 0
  gradient_accumulation_steps: int = 1
  z_loss_coef: float = 1e-4               # output-logit z-loss
  distill_soft_weight: float = 0.0        # distillation: weight of the teacher's probabilities in the target
                                          # (Switch paper: 0.25; needs batches with teacher_logits)
  distill_temperature: float = 1.0        # distillation: softmax temperature of teacher and student
  batch_size: int = 32                    # global (all processes together)
  inputs_length: int = 512
  targets_length: int = 114
  seed: int = 0
  log_every: int = 50                     # metrics to metrics.jsonl / TensorBoard every N steps
  eval_every: int = 500                   # held-out evaluation every N steps (0: only at the end)
  eval_batches: int = 8
  checkpoint_every: int = 1000            # and always at the end (0: only at the end)
  keep_checkpoints: int = 3

  def __post_init__(self):
    own = "TrainConfig"
    if self.optimizer not in OPTIMIZERS:
      _fail(own, "optimizer", self.optimizer, f"choose one of {OPTIMIZERS}.")
    if self.schedule not in SCHEDULES:
      _fail(own, "schedule", self.schedule, f"choose one of {SCHEDULES}.")
    for name in ("learning_rate", "batch_size", "inputs_length", "targets_length", "num_train_steps",
                 "gradient_accumulation_steps"):
      if not getattr(self, name) > 0:
        _fail(own, name, getattr(self, name), "must be > 0.")
    if self.warmup_steps < 0:
      _fail(own, "warmup_steps", self.warmup_steps, "must be >= 0.")
    for name in ("log_every", "eval_batches", "keep_checkpoints"):
      if getattr(self, name) < 1:
        _fail(own, name, getattr(self, name), "must be >= 1.")
    for name in ("eval_every", "checkpoint_every"):
      if getattr(self, name) < 0:
        _fail(own, name, getattr(self, name), "must be >= 0 (0: only at the end).")
    if self.adam_moments_dtype not in ("float32", "bfloat16"):
      _fail(own, "adam_moments_dtype", self.adam_moments_dtype, "choose 'float32' or 'bfloat16'.")
    if self.adam_moments_dtype == "bfloat16" and self.optimizer != "adamw":
      _fail(own, "adam_moments_dtype", self.adam_moments_dtype,
            f"applies to optimizer='adamw' only (optimizer={self.optimizer!r} keeps its own state); "
            "leave it at 'float32'.")
    if self.adam_moments_dtype == "bfloat16" and 1 - self.adam_b2 < BF16_MIN_MOMENT_STEP:
      _fail(own, "adam_moments_dtype", self.adam_moments_dtype,
            f"with adam_b2={self.adam_b2} the bfloat16 second moment averages its rounding noise over too few "
            f"of its tiny steps ({1 - self.adam_b2:.4g} of itself each) and carries more than ~5% noise. Use "
            f"adam_b2 <= {1 - BF16_MIN_MOMENT_STEP:g} or adam_moments_dtype='float32'.")
    if not 0.0 <= self.distill_soft_weight <= 1.0:
      _fail(own, "distill_soft_weight", self.distill_soft_weight, "must be in [0, 1] (0: no distillation).")
    if not self.distill_temperature > 0:
      _fail(own, "distill_temperature", self.distill_temperature, "must be > 0.")
    if self.batch_size % self.gradient_accumulation_steps:
      _fail(own, "gradient_accumulation_steps", self.gradient_accumulation_steps,
            f"must divide batch_size={self.batch_size} (each micro-batch gets the same number of rows).")


DATA_SOURCES = ("builtin", "text", "tfds")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it becomes span-corrupted, packed batches (switchx/data)."""

  source: str = "builtin"                 # "builtin" (ships with Python), "text" (files), "tfds" (prepared)
  paths: tuple[str, ...] = ()             # source="text": .txt (blank-line separated) / .jsonl files
  text_field: str = "text"                # JSON-lines / tfds feature holding the text
  tfds_name: str = ""                     # source="tfds": e.g. "c4/en:3.1.0"
  tfds_data_dir: str = ""
  train_split: str = "train"
  eval_split: str = "validation"          # tfds only; other sources hold out eval_fraction of the documents
  eval_fraction: float = 0.02
  split_seed: int = 0                     # chooses the held-out documents (and so the trained tokenizer and the
                                          # held-out batches): fixed across training seeds, so seeds compare
                                          # on one held-out set in one vocabulary
  tokenizer_path: str = ""                # a SentencePiece .model (T5's 32k one); "" trains one on the corpus
  tokenizer_vocab_size: int = 2000        # pieces of the trained tokenizer (100 sentinels are added on top)
  pack: bool = True
  noise_density: float = 0.15
  mean_noise_span_length: float = 3.0

  def __post_init__(self):
    own = "DataConfig"
    if self.source not in DATA_SOURCES:
      _fail(own, "source", self.source, f"choose one of {DATA_SOURCES}.")
    if self.source == "text" and not self.paths:
      _fail(own, "paths", self.paths, "source='text' needs at least one .txt or .jsonl file.")
    if self.source == "tfds" and not (self.tfds_name and self.tfds_data_dir):
      _fail(own, "tfds_data_dir" if self.tfds_name else "tfds_name", "",
            "source='tfds' needs tfds_name and tfds_data_dir (a directory where the dataset was prepared).")
    if not 0 < self.eval_fraction < 1:
      _fail(own, "eval_fraction", self.eval_fraction, "must be in (0, 1).")
    if self.split_seed < 0:
      _fail(own, "split_seed", self.split_seed, "must be >= 0.")
    if self.tokenizer_vocab_size < 8:
      _fail(own, "tokenizer_vocab_size", self.tokenizer_vocab_size, "must be >= 8.")
    if not isinstance(self.paths, tuple):
      object.__setattr__(self, "paths", tuple(self.paths))


DECODE_STRATEGIES = ("greedy", "beam", "sample")
# How MoE layers route while decoding. "no_drop": capacity = group size, so nothing is dropped and a sequence's
# output never depends on the other rows of the batch (the default). "eval_capacity": the model's own
# MoeConfig.eval_capacity_factor (or expert_capacity), as in evaluation; each step then routes the batch's
# current tokens together, so rows can crowd each other out of an expert.
DECODE_ROUTING = ("no_drop", "eval_capacity")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How switchx.decode generates text: the search strategy and its settings (switchx/decode.py)."""

  strategy: str = "greedy"               # "greedy", "beam" or "sample"
  max_decode_length: int = 64            # generated tokens per row, EOS included
  beam_size: int = 4                     # beam: hypotheses kept per row
  length_penalty: float = 0.6            # beam: T5's alpha; scores are log p / ((5 + length) / 6) ** alpha
  temperature: float = 1.0               # sample: logits / temperature; 0 takes the most likely token
  top_k: int = 0                         # sample: only the k most likely tokens (0: no limit)
  top_p: float = 1.0                     # sample: only the smallest set of tokens with probability >= top_p
  seed: int = 0                          # sample: the random stream
  moe_routing: str = "no_drop"           # see DECODE_ROUTING

  def __post_init__(self):
    own = "DecodeConfig"
    if self.strategy not in DECODE_STRATEGIES:
      _fail(own, "strategy", self.strategy, f"choose one of {DECODE_STRATEGIES}.")
    if self.max_decode_length < 1:
      _fail(own, "max_decode_length", self.max_decode_length, "must be >= 1 token.")
    if self.beam_size < 1:
      _fail(own, "beam_size", self.beam_size, "must be >= 1 (1 is greedy search with EOS bookkeeping).")
    if not (math.isfinite(self.length_penalty) and self.length_penalty >= 0):
      _fail(own, "length_penalty", self.length_penalty, "must be a finite number >= 0 (0: no penalty).")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      _fail(own, "temperature", self.temperature, "must be >= 0 (0: always the most likely token).")
    if self.top_k < 0:
      _fail(own, "top_k", self.top_k, "must be >= 0 (0: no limit).")
    if not 0 < self.top_p <= 1:
      _fail(own, "top_p", self.top_p, "must be in (0, 1] (1: no limit).")
    if self.moe_routing not in DECODE_ROUTING:
      _fail(own, "moe_routing", self.moe_routing, f"choose one of {DECODE_ROUTING}.")


TASK_SOURCES = ("jsonl", "tfds")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """One fine-tuning task: (input, target) text pairs from JSON-lines files or a prepared tfds dataset."""

  name: str = ""
  source: str = "jsonl"                  # "jsonl": local files of {"input": ..., "target": ...}; "tfds"
  train_path: str = ""                   # jsonl
  validation_path: str = ""              # jsonl; "" holds out nothing (no task metrics for this task)
  tfds_name: str = ""                    # tfds: e.g. "glue/sst2:2.0.0", prepared as array_record
  tfds_data_dir: str = ""
  train_split: str = "train"
  validation_split: str = "validation"
  input_field: str = "input"             # the record's field holding the input text
  target_field: str = "target"           # ... and the target text
  input_prefix: str = ""                 # prepended to every input, e.g. "topic: " (T5's task prefixes)
  rate: float = 1.0                      # relative sampling rate in a mixture (normalised over the tasks)

  def __post_init__(self):
    own = f"TaskConfig({self.name!r})" if self.name else "TaskConfig"
    if not self.name:
      _fail(own, "name", self.name, "every task needs a name (it labels its metrics).")
    if self.source not in TASK_SOURCES:
      _fail(own, "source", self.source, f"choose one of {TASK_SOURCES}.")
    if self.source == "jsonl" and not self.train_path:
      _fail(own, "train_path", self.train_path, "source='jsonl' needs a JSON-lines file of training pairs.")
    if self.source == "tfds" and not (self.tfds_name and self.tfds_data_dir):
      _fail(own, "tfds_data_dir" if self.tfds_name else "tfds_name", "",
            "source='tfds' needs tfds_name and tfds_data_dir (a directory where the dataset was prepared).")
    if not (math.isfinite(self.rate) and self.rate > 0):
      _fail(own, "rate", self.rate, "a mixture rate must be a finite number > 0; drop the task to leave it out.")
    if not (self.input_field and self.target_field):
      _fail(own, "input_field" if not self.input_field else "target_field", "", "must name a field.")


FREEZE_OPTIONS = ("none", "experts", "non_experts", "router")
FINETUNE_METRICS = ("exact_match", "token_accuracy", "neg_log_perplexity")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Fine-tuning a checkpoint on a task or a mixture of tasks (switchx/train/finetune.py)."""

  init_from: str = ""                    # a switchx run directory (its newest checkpoint; DIR/best for the
                                         # best one) or a switchx.save / transformers directory
  tasks: tuple[TaskConfig, ...] = ()     # one task, or a mixture sampled by the tasks' rates
  freeze: str = "none"                   # "none", "experts", "non_experts" (all but the experts) or "router"
  pack: bool = True                      # several short examples per row (False: one example per row)
  eval_examples: int = 256               # validation examples per task scored and decoded each eval (0: all)
  max_decode_length: int = 0             # greedy decodes of the eval; 0: TrainConfig.targets_length
  best_metric: str = "exact_match"       # averaged over the tasks; the best checkpoint keeps its maximum

  def __post_init__(self):
    own = "FinetuneConfig"
    if not isinstance(self.tasks, tuple):
      object.__setattr__(self, "tasks", tuple(self.tasks))
    for task in self.tasks:
      if not isinstance(task, TaskConfig):
        _fail(own, "tasks", task, "every task must be a TaskConfig.")
    names = [task.name for task in self.tasks]
    if len(set(names)) != len(names):
      _fail(own, "tasks", names, "task names must be unique (they label the metrics and the sampler state).")
    if self.freeze not in FREEZE_OPTIONS:
      _fail(own, "freeze", self.freeze, f"choose one of {FREEZE_OPTIONS}.")
    if self.eval_examples < 0:
      _fail(own, "eval_examples", self.eval_examples, "must be >= 0 (0: the whole validation split).")
    if self.max_decode_length < 0:
      _fail(own, "max_decode_length", self.max_decode_length, "must be >= 0 (0: TrainConfig.targets_length).")
    if self.best_metric not in FINETUNE_METRICS:
      _fail(own, "best_metric", self.best_metric, f"choose one of {FINETUNE_METRICS}.")


# --- (de)serialisation: the JSON form of a ModelConfig (config.json of runs and saved models) -------------
FORMAT_VERSION = 1


ARCHITECTURES = {"encoder_decoder": ModelConfig, "decoder_only": DecoderOnlyConfig}


def config_to_dict(config: ModelConfig | DecoderOnlyConfig) -> dict:
  """The JSON form of a config (the moe field nested; a decoder-only one says so in "architecture")."""
  tag = {"architecture": "decoder_only"} if isinstance(config, DecoderOnlyConfig) else {}
  return {"switchx_format_version": FORMAT_VERSION, **tag, **dataclasses.asdict(config)}


def config_from_dict(fields: dict, source: str = "config") -> ModelConfig | DecoderOnlyConfig:
  """A ModelConfig (or DecoderOnlyConfig) from its JSON form; unknown fields are an error (a newer switchx?)."""
  fields = {k: v for k, v in fields.items() if k != "switchx_format_version"}
  # Runs recorded before their config.json named a decoder-only model's architecture: its fields tell.
  untagged = "decoder_only" if "num_layers" in fields and "num_encoder_layers" not in fields else "encoder_decoder"
  architecture = fields.pop("architecture", untagged)
  if architecture not in ARCHITECTURES:
    raise ValueError(f"{source}: architecture {architecture!r} is unknown (this switchx reads "
                     f"{', '.join(ARCHITECTURES)}); was it written by a newer switchx?")
  cls = ARCHITECTURES[architecture]
  known = {f.name for f in dataclasses.fields(cls)}
  moe_known = {f.name for f in dataclasses.fields(MoeConfig)}
  moe = fields.pop("moe", {}) or {}
  unknown = sorted(set(fields) - known) + sorted(f"moe.{k}" for k in set(moe) - moe_known)
  if unknown:
    raise ValueError(f"{source}: unknown config fields {unknown}; was it written by a newer switchx? Remove them "
                     "or upgrade switchx.")
  for name in ("encoder_sparse", "decoder_sparse", "sparse"):
    if isinstance(fields.get(name), list):
      fields[name] = tuple(fields[name])
  try:
    return cls(**fields, moe=MoeConfig(**moe))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source}: invalid config: {e}") from e

"""The training objective: cross-entropy (+ output-logit z-loss) normalised by real target tokens, plus the MoE
layers' load-balancing and router z-losses. One function combines them, with consistent metric names.

With MoeConfig.semantics="transformers" the MoE terms are transformers' SwitchTransformers router losses
(`transformers_router_losses`), so total_loss equals transformers' loss for the same inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from switchx.config import ModelConfig


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss_coef: float = 0.0):
  """Sums over tokens (normalise by the caller): (cross-entropy sum, z-loss sum, correct predictions).

  logits [B, L, V] float32, targets [B, L] int, weights [B, L] float (0 on padding). The z-loss
  z_loss_coef * logsumexp(logits)^2 keeps the softmax normaliser near 1 (as in T5 / PaLM).
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)                                   # [B, L]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = (log_z - target_logit) * weights
  z = z_loss_coef * jnp.square(log_z) * weights
  # Correct: the target's logit is the largest (tied with another word's, it counts; argmax would take the
  # first of them). A comparison per token, where argmax's index pass over the vocabulary wrote an int32
  # [B, L, V] array (~3% of a bfloat16 training step at V = 32128).
  correct = (target_logit >= jnp.max(logits, axis=-1)) * weights
  return ce.sum(), z.sum(), correct.sum()


def soft_cross_entropy(logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array,
                       temperature: float = 1.0) -> jax.Array:
  """Sum over real target tokens of the cross-entropy from softmax(teacher_logits / T) to softmax(logits / T).
  logits, teacher_logits [B, L, V] (the teacher's held constant: no gradient flows into it)."""
  teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, axis=-1)
  log_student = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return (-(teacher * log_student).sum(-1) * weights).sum()


def argmax(logits: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first maximum; the first NaN if any), as int32, in two plain reductions.
  XLA's CPU backend runs argmax's (value, index) reduction unvectorised (slow over a large vocabulary in every
  greedy decoding step)."""
  best = jnp.max(logits, axis=-1, keepdims=True)                                 # NaN if any is NaN
  hits = (logits == best) | jnp.isnan(logits)
  return jnp.min(jnp.where(hits, jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape[-1]), axis=-1)


def moe_losses(config: ModelConfig, moe_aux: dict) -> tuple[jax.Array, jax.Array]:
  """(sum over layers of the load-balancing loss, sum over layers of the router z-loss), unweighted."""
  balance = sum((aux["load_balance_loss"] for aux in moe_aux.values()), jnp.zeros((), jnp.float32))
  router_z = sum((aux["router_z_loss"] for aux in moe_aux.values()), jnp.zeros((), jnp.float32))
  return balance, router_z


def transformers_router_losses(config: ModelConfig, moe_aux: dict) -> tuple[jax.Array, jax.Array]:
  """(load-balancing loss, router z-loss) as transformers' SwitchTransformersForConditionalGeneration computes
  them, unweighted; needs the aux of layers run with MoeConfig.semantics="transformers".

  Per stack, over the concatenation of its sparse layers' router logits [B, n_layers * L, E]:
    z = mean over all tokens (padding included) of logsumexp(logits)^2
    balance = E^2 * mean over (B, E) of f * P, f = fraction of tokens whose argmax (pre-capacity) is e,
              P = mean router probability, both per sequence.
  Concatenating equal-length layers averages f and P over layers (then multiplies), and z over layers.
  As in transformers 5.24, a stack contributes only when its sparse step is > 1, i.e. when some but not all of
  its layers are sparse; a stack whose layers are all sparse (step 1) contributes 0. The stacks' terms add.
  """
  balance = router_z = jnp.zeros((), jnp.float32)
  for stack, layers, num_layers in (("encoder", config.encoder_sparse_layers, config.num_encoder_layers),
                                    ("decoder", config.decoder_sparse_layers, config.num_decoder_layers)):
    if not 0 < len(layers) < num_layers:
      continue
    stack_aux = [moe_aux[f"{stack}/layers_{i}"] for i in layers]
    mean_over_layers = lambda key: jnp.mean(jnp.stack([aux[key] for aux in stack_aux]), axis=0)
    fraction, mean_prob = mean_over_layers("argmax_fraction"), mean_over_layers("mean_router_prob")  # [B, E]
    balance += fraction.shape[-1] ** 2 * jnp.mean(fraction * mean_prob)
    router_z += mean_over_layers("router_z_loss")
  return balance, router_z


def total_loss(config: ModelConfig, logits: jax.Array, moe_aux: dict, batch: dict,
               z_loss_coef: float | None = None, num_tokens: jax.Array | None = None,
               moe_weight: float = 1.0, soft_weight: float = 0.0, temperature: float = 1.0
               ) -> tuple[jax.Array, dict]:
  """The scalar to differentiate and the metrics to log.

  loss = (CE + output z-loss) / real target tokens + balance_coef * balance + router_z_coef * router z, where
  balance and router z are sums over layers (semantics "switch") or transformers_router_losses (semantics
  "transformers"). z_loss_coef (output-logit z-loss) None means 1e-4 under "switch" and 0 under "transformers",
  which has none. Metrics are named `*_loss` for losses, `router/*` for router statistics.
  With gradient accumulation each micro-batch passes the whole batch's `num_tokens` and `moe_weight` =
  1 / micro-batches, so the micro-batch losses add up to the whole batch's loss.
  Distillation (soft_weight w > 0, batch["teacher_logits"] [B, L, V]): the CE term becomes
  (1 - w) * CE(targets) + w * CE(softmax(teacher / T) -> softmax(logits / T)), i.e. the cross-entropy to the
  target mixing w of the teacher's probabilities with 1 - w of the one-hot target (Switch paper, Table 6: w =
  0.25). "cross_entropy_loss" stays the hard targets' (what held-out evaluation reports); "distill_loss" is the
  soft term. w = 0 leaves the loss exactly as without a teacher.
  """
  hf_semantics = config.moe.semantics == "transformers"
  if z_loss_coef is None:
    z_loss_coef = 0.0 if hf_semantics else 1e-4
  targets = batch["decoder_target_tokens"]
  weights = batch.get("decoder_loss_weights")
  if weights is None:
    weights = (targets > 0).astype(jnp.float32)
  if num_tokens is None:
    num_tokens = weights.sum()
  num_tokens = jnp.maximum(num_tokens, 1.0)
  ce, z, correct = cross_entropy(logits, targets, weights, z_loss_coef)
  objective = ce
  if soft_weight > 0:
    if "teacher_logits" not in batch:
      raise ValueError("distillation (TrainConfig.distill_soft_weight > 0) needs batches with teacher_logits: "
                       "train through switchx.train.distill, or set distill_soft_weight=0.")
    soft = soft_cross_entropy(logits, batch["teacher_logits"], weights, temperature)
    objective = (1.0 - soft_weight) * ce + soft_weight * soft
  balance, router_z = (transformers_router_losses if hf_semantics else moe_losses)(config, moe_aux)
  moe = config.moe
  moe_term = moe.load_balance_loss_coef * balance + moe.router_z_loss_coef * router_z
  loss = (objective + z) / num_tokens + moe_weight * moe_term
  metrics = {
      "loss": loss,
      "cross_entropy_loss": ce / num_tokens,
      "z_loss": z / num_tokens,
      "accuracy": correct / num_tokens,
      "num_target_tokens": weights.sum(),
  }
  if soft_weight > 0:
    metrics["distill_loss"] = soft / num_tokens
  if moe_aux:
    metrics["load_balance_loss"] = balance
    metrics["router_z_loss"] = router_z
    metrics["router/dropped_fraction"] = jnp.mean(jnp.stack([a["dropped_fraction"] for a in moe_aux.values()]))
    for name, aux in moe_aux.items():
      for key in ("load_balance_loss", "router_z_loss", "dropped_fraction", "router_confidence",
                  "router_entropy", "expert_usage", "dropped_fraction_by_rank", "load_cv", "max_mean_load",
                  "idle_experts", "router_bias"):
        if key in aux:
          metrics[f"router/{name}/{key}"] = aux[key]
  return loss, metrics

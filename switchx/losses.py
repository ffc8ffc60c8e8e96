"""The training objective: cross-entropy (+ output-logit z-loss) normalised by real target tokens, plus the MoE
layers' load-balancing and router z-losses. One function combines them, with consistent metric names."""

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
  correct = (jnp.argmax(logits, -1) == targets) * weights
  return ce.sum(), z.sum(), correct.sum()


def moe_losses(config: ModelConfig, moe_aux: dict) -> tuple[jax.Array, jax.Array]:
  """(sum over layers of the load-balancing loss, sum over layers of the router z-loss), unweighted."""
  balance = sum((aux["load_balance_loss"] for aux in moe_aux.values()), jnp.zeros((), jnp.float32))
  router_z = sum((aux["router_z_loss"] for aux in moe_aux.values()), jnp.zeros((), jnp.float32))
  return balance, router_z


def total_loss(config: ModelConfig, logits: jax.Array, moe_aux: dict, batch: dict,
               z_loss_coef: float = 1e-4, num_tokens: jax.Array | None = None,
               moe_weight: float = 1.0) -> tuple[jax.Array, dict]:
  """The scalar to differentiate and the metrics to log.

  loss = (CE + output z-loss) / real target tokens + balance_coef * sum_layers(balance) + router_z_coef *
  sum_layers(router z). Metrics are named `*_loss` for losses, `router/*` for router statistics.
  With gradient accumulation each micro-batch passes the whole batch's `num_tokens` and `moe_weight` =
  1 / micro-batches, so the micro-batch losses add up to the whole batch's loss.
  """
  targets = batch["decoder_target_tokens"]
  weights = batch.get("decoder_loss_weights")
  if weights is None:
    weights = (targets > 0).astype(jnp.float32)
  if num_tokens is None:
    num_tokens = weights.sum()
  num_tokens = jnp.maximum(num_tokens, 1.0)
  ce, z, correct = cross_entropy(logits, targets, weights, z_loss_coef)
  balance, router_z = moe_losses(config, moe_aux)
  moe = config.moe
  moe_term = moe.load_balance_loss_coef * balance + moe.router_z_loss_coef * router_z
  loss = (ce + z) / num_tokens + moe_weight * moe_term
  metrics = {
      "loss": loss,
      "cross_entropy_loss": ce / num_tokens,
      "z_loss": z / num_tokens,
      "accuracy": correct / num_tokens,
      "num_target_tokens": weights.sum(),
  }
  if moe_aux:
    metrics["load_balance_loss"] = balance
    metrics["router_z_loss"] = router_z
    metrics["router/dropped_fraction"] = jnp.mean(jnp.stack([a["dropped_fraction"] for a in moe_aux.values()]))
    for name, aux in moe_aux.items():
      for key in ("load_balance_loss", "router_z_loss", "dropped_fraction", "router_confidence",
                  "router_entropy", "expert_usage", "dropped_fraction_by_rank"):
        metrics[f"router/{name}/{key}"] = aux[key]
  return loss, metrics

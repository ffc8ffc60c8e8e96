"""Pure train and eval steps. They know nothing of meshes: train/loop.py jits them with shardings and donation.

A batch is a dict of [B, L] arrays as the data pipeline makes them (switchx/data/packing.py):
encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights and, when packed,
*_segment_ids and *_positions.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from switchx.losses import total_loss
from switchx.models.decoder_only import DecoderOnly
from switchx.models.encoder_decoder import EncoderDecoder
from switchx.moe import routing
from switchx.quantize import dequantize

MODEL_INPUTS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "encoder_segment_ids",
                "decoder_segment_ids", "encoder_positions", "decoder_positions", "encoder_task_ids",
                "decoder_task_ids")
# Metrics that add up over micro-batches (each is already divided by the whole batch's token count).
ADDITIVE_METRICS = ("loss", "cross_entropy_loss", "z_loss", "accuracy", "num_target_tokens")
RNG_STREAMS = ("dropout", "jitter", "routing")
EXPERT_LOAD = "expert_load"  # the metrics entry (a tree, popped by train_step) that bias balancing updates from


@flax.struct.dataclass
class TrainState:
  step: jax.Array   # int32 scalar: optimizer updates done
  params: Any
  opt_state: Any


def init_train_state(model: EncoderDecoder | DecoderOnly, optimizer: optax.GradientTransformation, rng: jax.Array,
                     batch: dict) -> TrainState:
  """Fresh parameters (unboxed: plain arrays) and optimizer state. The loop jits this with out_shardings
  computed from the parameters' logical axes, so each device creates only its own shard."""
  return start_train_state(optimizer, init_params(model, rng, batch))


def init_params(model: EncoderDecoder | DecoderOnly, rng: jax.Array, batch: dict):
  return nn.unbox(init_variables(model, rng, batch)["params"])


def init_variables(model: EncoderDecoder | DecoderOnly, rng: jax.Array, batch: dict):
  """model.init on a batch's model inputs (boxed: logical axis names kept)."""
  if isinstance(model, DecoderOnly):
    return model.init(rng, **causal_inputs(batch))
  return model.init(rng, **model_inputs(batch))


def apply_model(model: EncoderDecoder | DecoderOnly, variables: dict, batch: dict, **kwargs):
  """model.apply on a batch: an encoder-decoder reads its MODEL_INPUTS, a decoder-only model the decoder's
  tokens, segment ids and positions (the causal-LM batches of data.CausalPipeline)."""
  if isinstance(model, DecoderOnly):
    return model.apply(variables, **causal_inputs(batch), **kwargs)
  return model.apply(variables, **model_inputs(batch), **kwargs)


def causal_inputs(batch: dict) -> dict:
  return {"tokens": batch["decoder_input_tokens"], "segment_ids": batch.get("decoder_segment_ids"),
          "positions": batch.get("decoder_positions")}


def start_train_state(optimizer: optax.GradientTransformation, params) -> TrainState:
  """Step 0 and a fresh optimizer state around `params`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def model_inputs(batch: dict) -> dict:
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def target_weights(batch: dict) -> jax.Array:
  weights = batch.get("decoder_loss_weights")
  return (batch["decoder_target_tokens"] > 0).astype(jnp.float32) if weights is None else weights


def loss_and_metrics(params, batch: dict, rng: jax.Array | None, *, model: EncoderDecoder | DecoderOnly,
                     z_loss_coef: float, train: bool, num_tokens=None, moe_weight: float = 1.0,
                     distill: tuple[float, float] = (0.0, 1.0)):
  """(loss, metrics) of one batch; distill = (soft weight, temperature), see losses.total_loss."""
  rngs = None
  if train:
    rngs = {name: jax.random.fold_in(rng, i) for i, name in enumerate(RNG_STREAMS)}
  (logits, moe_aux), state = apply_model(model, {"params": dequantize(params)}, batch, train=train, rngs=rngs,
                                         mutable=["balance"])
  loss, metrics = total_loss(model.config, logits, moe_aux, batch, z_loss_coef, num_tokens, moe_weight, *distill)
  if state.get("balance"):          # bias balancing: each layer's choices per expert, for train_step
    metrics[EXPERT_LOAD] = state["balance"]
  return loss, metrics


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model: EncoderDecoder | DecoderOnly,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule, z_loss_coef: float = 1e-4,
               accumulation_steps: int = 1, distill: tuple[float, float] = (0.0, 1.0)) -> tuple[TrainState, dict]:
  """One optimizer update. With accumulation_steps = k the batch is split into k micro-batches whose
  gradients are summed (a scan), each loss already normalised by the whole batch's target-token count."""
  rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
  kwargs = dict(model=model, z_loss_coef=z_loss_coef, train=True, distill=distill)
  if accumulation_steps == 1:
    (_, metrics), grads = grad_fn(state.params, batch, rng, **kwargs)
  else:
    k = accumulation_steps
    num_tokens = target_weights(batch).sum()
    micro = jax.tree_util.tree_map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

    def accumulate(grads_sum, step_and_batch):
      i, micro_batch = step_and_batch
      (_, m), g = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, i), num_tokens=num_tokens,
                          moe_weight=1.0 / k, **kwargs)
      return jax.tree_util.tree_map(jnp.add, grads_sum, g), m

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    grads, stacked = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
    metrics = {name: jax.tree_util.tree_map(lambda a: a.sum(0), v) if name in ADDITIVE_METRICS + (EXPERT_LOAD,)
               else v.mean(0) for name, v in stacked.items()}

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if EXPERT_LOAD in metrics:
    params = balance_biases(state.params, params, metrics.pop(EXPERT_LOAD), model.config.moe.bias_balance_rate)
  metrics["learning_rate"] = schedule(state.step)
  metrics["grad_norm"] = global_norm(grads)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def balance_biases(old_params, new_params, loads, rate: float):
  """Bias balancing after the optimizer's update: every "router_bias" is its value before the step moved by
  routing.balance_bias from that layer's load (whatever the optimizer did to it is discarded: the bias has no
  gradient, and weight decay must not shrink it). loads: the sown tree, {..., "router_bias": (load [E],)}."""
  old, new = traverse_util.flatten_dict(old_params), traverse_util.flatten_dict(new_params)
  for path, sown in traverse_util.flatten_dict(loads).items():
    new[path] = routing.balance_bias(old[path], sum(sown), rate)
  return traverse_util.unflatten_dict(new)


def global_norm(tree) -> jax.Array:
  """optax.global_norm, computed so that it reads each gradient once. Without the barrier XLA shares the
  square of the gradient between this sum and AdamW's second-moment update, and writes that square out as a
  full-size buffer (8 extra bytes of traffic per parameter); the barrier keeps the two squares apart, each
  fused into its own consumer."""
  leaves = [jax.lax.optimization_barrier(g) for g in jax.tree_util.tree_leaves(tree)]
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))


def eval_step(params, batch: dict, *, model: EncoderDecoder | DecoderOnly, z_loss_coef: float = 0.0) -> dict:
  """Eval-mode metrics (no dropout, eval capacity factor) for one batch."""
  return loss_and_metrics(params, batch, None, model=model, z_loss_coef=z_loss_coef, train=False)[1]

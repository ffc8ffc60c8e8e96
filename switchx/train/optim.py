"""Optimizers and learning-rate schedules (optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from switchx.config import ModelConfig, TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  lr, warmup = cfg.learning_rate, cfg.warmup_steps
  if cfg.schedule == "constant":
    return optax.constant_schedule(lr)
  if cfg.schedule == "constant_then_rsqrt":
    # T5 / Switch: constant lr for `warmup` steps, then lr * sqrt(warmup / step) (= 1/sqrt(step) for 0.01, 10k).
    return lambda step: lr * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, max(warmup, 1)))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(cfg.num_train_steps, warmup + 1),
      end_value=lr * cfg.end_learning_rate_fraction)


def make_optimizer(cfg: TrainConfig, freeze: str = "none", config: ModelConfig | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule). `freeze` ("none", "experts", "non_experts", "router"; FinetuneConfig.freeze) sends
  the frozen parameters' gradients to optax.set_to_zero: their updates are exactly 0, they stay bit-identical
  and carry no optimizer state. `config` (the model's) lets a freezing option a dense model cannot take fail
  here, before anything is built."""
  if config is not None and freeze != "none" and not config.is_sparse:
    raise ValueError(f"FinetuneConfig.freeze={freeze!r} needs a model with MoE layers; this one is dense "
                     "(no experts or routers to tell apart). Use freeze='none'.")
  tx, schedule = _optimizer(cfg)
  if freeze == "none":
    return tx, schedule
  labels = lambda params: jax.tree_util.tree_map(lambda f: "frozen" if f else "trained",
                                                 frozen_mask(params, freeze))
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels), schedule


def _optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(cfg)
  if cfg.optimizer == "adafactor":
    # T5's settings: factored second moments, decay rate 0.8, update clipping 1.0, no momentum, updates scaled
    # by the parameter's RMS.
    adafactor = t5_adafactor(schedule)
    # Expert weights [E, D, F] are E independent matrices: factor each one's second moments over (D, F) and clip
    # and scale each expert on its own (as t5x does), instead of letting optax factor over the two largest
    # dims, which would mix experts whenever E exceeds D or F.
    tx = optax.multi_transform({"expert": per_expert(adafactor), "dense": adafactor}, param_kinds)
  else:
    moments_dtype = jnp.dtype(cfg.adam_moments_dtype)
    scale = (optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2) if moments_dtype == jnp.float32 else
             scale_by_adam_stored_as(moments_dtype, b1=cfg.adam_b1, b2=cfg.adam_b2))
    # optax.adamw's chain, so the state is the same tree whatever the moments' dtype.
    tx = optax.chain(scale, optax.add_decayed_weights(cfg.weight_decay), optax.scale_by_learning_rate(schedule))
    if cfg.grad_clip_norm > 0:
      tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx, schedule  # gradient accumulation happens inside the train step (train/step.py)


def scale_by_adam_stored_as(dtype, b1: float, b2: float, eps: float = 1e-8) -> optax.GradientTransformation:
  """optax.scale_by_adam with both moments stored in `dtype` (bfloat16: 8 instead of 12 bytes of training
  state per parameter with the float32 parameters). Each step reads the moments, updates them in float32,
  stores them rounded, and computes the update from the stored values; the state is optax's ScaleByAdamState.
  The bfloat16 second moment rounds stochastically (`round_stochastically`): round to nearest loses every change
  smaller than half a bfloat16 step, so a second moment moving by (1 - b2) of itself per step would lag its true
  value (tests/test_train_step.py: at b2 = 0.98 an average meant to fall from 1.0 to 0.9 sticks at 0.996; in a
  simulation at b2 = 0.999 it stayed 2.4x too large after the gradients halved).
  (Computing the update from the unrounded float32 moments instead made XLA's CPU backend materialise them:
  +0.5 bytes per parameter of step temporaries and a 15% slower 512-expert step.)"""
  f32 = lambda x: x.astype(jnp.float32)
  dtype = jnp.dtype(dtype)

  def init(params):
    zeros = lambda: jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, dtype), params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

  def update(grads, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    # The second moment moves by (1 - b2) of itself per step, below bfloat16's resolution: it rounds
    # stochastically. The first moment moves by (1 - b1) of itself (10% at b1 = 0.9), well above it: to nearest.
    store_nu = lambda x: round_stochastically(x, count) if dtype == jnp.bfloat16 else x.astype(dtype)
    mu = jax.tree_util.tree_map(lambda m, g: (b1 * f32(m) + (1 - b1) * f32(g)).astype(dtype), state.mu, grads)
    nu = jax.tree_util.tree_map(lambda v, g: store_nu(b2 * f32(v) + (1 - b2) * jnp.square(f32(g))), state.nu, grads)
    step = count.astype(jnp.float32)
    mu_correction, nu_correction = 1 - b1 ** step, 1 - b2 ** step
    updates = jax.tree_util.tree_map(
        lambda m, v, g: ((f32(m) / mu_correction) / (jnp.sqrt(f32(v) / nu_correction) + eps)).astype(g.dtype),
        mu, nu, grads)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def round_stochastically(x: jax.Array, step: jax.Array) -> jax.Array:
  """float32 -> bfloat16, rounding up with probability (distance to the lower bfloat16) / (its step), so the
  stored value is unbiased: E[round(x)] = x. The 16 random bits are a multiplicative hash of x's own bits (the
  16 rounded away are the least predictable) and the step: no random-number generator state, three integer
  operations per element in the same loop. Infinities and zeros stay as they are."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  noise = (bits * jnp.uint32(0x9E3779B1) + step.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)) >> 16
  # Adding 16 random low bits and truncating rounds the magnitude up with the right probability (sign apart).
  rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def t5_adafactor(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """optax.adafactor with T5's settings (factored second moments, decay rate 0.8, update clipping 1.0, no
  momentum, updates scaled by the parameter's RMS), built from the same pieces, so its state is the same tree.

  One piece differs: the parameter scale. optax's scale_by_param_block_rms takes the RMS through
  safe_root_mean_squares, which (to keep a gradient at zero) writes out a full-size select of every parameter
  before reducing it; an optimizer is never differentiated, so a plain max(RMS, 1e-3) gives the same values
  and reads each parameter once (at 128 experts that select was a fifth of the training step).
  """
  return optax.chain(
      optax.scale_by_factored_rms(factored=True, decay_rate=0.8, step_offset=0, min_dim_size_to_factor=128,
                                  epsilon=1e-30),
      optax.clip_by_block_rms(1.0),
      optax.scale_by_learning_rate(learning_rate, flip_sign=False),
      scale_by_param_rms(min_scale=1e-3),
      optax.scale(-1))


def scale_by_param_rms(min_scale: float) -> optax.GradientTransformation:
  """Multiplies each update by max(RMS of its parameter, min_scale): optax.scale_by_param_block_rms's values."""

  def update(updates, state, params=None):
    rms = lambda p: jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(p))), min_scale)
    return jax.tree_util.tree_map(lambda u, p: u * rms(p).astype(u.dtype), updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def is_expert_param(path) -> bool:
  return any(getattr(k, "key", None) == "experts" for k in path)


def param_kinds(params):
  """'expert' for the stacked expert weights (leading axis E), 'dense' for everything else."""
  return jax.tree_util.tree_map_with_path(lambda path, _: "expert" if is_expert_param(path) else "dense", params)


def per_expert(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Applies `tx` independently to each slice along the leading (expert) axis of every leaf."""
  empty = lambda tree: not jax.tree_util.tree_leaves(tree)  # a dense model has no expert leaves to vmap over

  def init(params):
    return tx.init(params) if empty(params) else jax.vmap(tx.init)(params)

  def update(updates, state, params=None):
    return tx.update(updates, state, params) if empty(updates) else jax.vmap(tx.update)(updates, state, params)

  return optax.GradientTransformation(init, update)


# --- freezing ----------------------------------------------------------------------------------------------
def _is_router(path) -> bool:
  keys = [getattr(k, "key", None) for k in path]
  return "moe" in keys and keys[-1] in ("router", "task_router")


def frozen_mask(params, freeze: str):
  """A tree of bools over the parameters: True where `freeze` ("none", "experts", "non_experts", "router")
  keeps the parameter fixed."""
  def frozen(path, _):
    if freeze == "experts":
      return is_expert_param(path)
    if freeze == "non_experts":
      return not is_expert_param(path)
    if freeze == "router":
      return _is_router(path)
    return False
  return jax.tree_util.tree_map_with_path(frozen, params)

"""Sharded training state and compiled steps: the bridge between the pure steps (step.py) and a mesh.

    run = build(model_config, train_config, partitioner, example_batch)
    run.compile_train_step(example_batch, rng)               # optional: compile before the state exists
    state = run.init(jax.random.PRNGKey(0))                  # each device creates only its own shards
    state, metrics = run.train_step(state, run.shard_batch(batch), rng)

Everything that can be wrong with a config and a mesh (a dimension the mesh does not divide, an axis name
without a rule, a batch the data axes do not split) is raised in `build`, before anything compiles.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from switchx.config import DecoderOnlyConfig, ModelConfig, TrainConfig
from switchx.models.decoder_only import DecoderOnly
from switchx.models.encoder_decoder import EncoderDecoder
from switchx.parallel.partitioning import Partitioner
from switchx.train import optim, step as step_lib


@dataclasses.dataclass
class Run:
  """A model, its optimizer and its compiled, sharded steps."""

  config: ModelConfig                 # with MoeConfig.num_group_partitions set from the mesh
  train_config: TrainConfig
  partitioner: Partitioner
  model: EncoderDecoder | DecoderOnly
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  state_specs: Any                    # TrainState of PartitionSpecs
  boxed_params: Any                   # abstract parameters with their logical names
  _init: Callable
  _init_from_params: Callable
  _train_step: Callable
  _eval_step: Callable
  _grads: Callable
  _compiled_train_step: Any = None    # set by compile_train_step

  @property
  def state_shardings(self):
    return self.partitioner.shardings(self.state_specs)

  def abstract_state(self):
    """ShapeDtypeStructs carrying the target shardings (what a checkpoint restores onto)."""
    shapes = jax.eval_shape(self._init, jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, self.state_shardings)

  def shard_batch(self, batch: dict) -> dict:
    """Host numpy batch (this process's rows) -> global arrays split over the batch axes."""
    sharding = self.partitioner.batch_sharding
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}

  def init(self, rng):
    with self.partitioner.context():
      return self._init(rng)

  def init_from_params(self, params):
    """A fresh TrainState (step 0, new optimizer state) around existing parameters, e.g. for fine-tuning."""
    params = jax.device_put(params, self.state_shardings.params)
    with self.partitioner.context():
      return self._init_from_params(params)

  def compile_train_step(self, batch: dict, rng) -> None:
    """Compiles the train step ahead of time from shapes alone (`batch`: a host batch of the global shape) and
    hands the compiler's freed scratch memory back to the OS. Call it before `init` / restoring, so compiling
    (~2 bytes per parameter at 512 experts) never sits in memory beside the training state; `train_step` then
    runs this executable for batches of this shape (others go through jit)."""
    batch_shapes = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
    with self.partitioner.context():
      lowered = self._train_step.lower(self.abstract_state(), batch_shapes, rng)
    self._compiled_train_step = (_shapes(batch_shapes), lowered.compile())
    release_freed_memory()

  @property
  def compiled_train_step(self):
    """The executable `compile_train_step` made (None before): e.g. `.memory_analysis()` without compiling again."""
    return None if self._compiled_train_step is None else self._compiled_train_step[1]

  def train_step(self, state, batch, rng):
    if self._compiled_train_step is not None and self._compiled_train_step[0] == _shapes(batch):
      return self._compiled_train_step[1](state, batch, rng)
    with self.partitioner.context():
      return self._train_step(state, batch, rng)

  def lower_train_step(self, state, batch, rng):
    """The train step lowered for these inputs, e.g. `.compile().memory_analysis()` (XLA's temporaries) or
    `.compile().as_text()` (the optimized HLO a profile's op names refer to)."""
    with self.partitioner.context():
      return self._train_step.lower(state, batch, rng)

  def eval_step(self, params, batch):
    with self.partitioner.context():
      return self._eval_step(params, batch)

  def grads(self, params, batch, rng, train: bool = True):
    """(loss, metrics), gradients of one batch: for inspection and the sharding tests."""
    with self.partitioner.context():
      return self._grads(params, batch, rng, train)


def compiler_options(partitioner: Partitioner) -> dict | None:
  """XLA options for the donated train step. On CPU, region-based copy insertion: the default analysis cannot
  prove that the backward's last read of a weight (for the input gradient, which the weight's own update does
  not depend on) comes before the in-place update of the donated buffer, so it copies every parameter at the
  start of each step (4 bytes per parameter of memory, 8 of traffic). The region analysis sees the order."""
  if partitioner.mesh.devices.flat[0].platform == "cpu":
    return {"xla_cpu_copy_insertion_use_region_analysis": True}
  return None


def _shapes(batch: dict) -> dict:
  return {k: (tuple(v.shape), jnp.dtype(v.dtype)) for k, v in batch.items()}


def release_freed_memory() -> None:
  """Gives the memory the C allocator holds as freed (e.g. XLA's compile-time scratch) back to the OS: glibc's
  malloc_trim. A no-op where the C library has none."""
  trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
  if trim is not None:
    trim(0)


def build(config: ModelConfig, train_config: TrainConfig, partitioner: Partitioner, example_batch: dict,
          optimizer: tuple[optax.GradientTransformation, optax.Schedule] | None = None) -> Run:
  """Validates the config against the mesh and compiles (lazily) init / train / eval steps with shardings.
  `optimizer` (transformation, schedule) replaces the one TrainConfig describes (fine-tuning's freezing)."""
  moe = dataclasses.replace(config.moe, num_group_partitions=partitioner.num_batch_partitions)
  config = config.replace(moe=moe)
  partitioner.check_batch(train_config.batch_size)
  expert_ways = dict(partitioner.mesh.shape).get("expert", 1)
  if config.is_sparse and moe.dispatch in ("dropless", "ragged") and expert_ways > 1:
    raise ValueError(f"MoeConfig.dispatch={moe.dispatch!r} reads whole expert weights, which the mesh splits "
                     f"over 'expert' ({expert_ways} ways): every step would all-gather them. Use dispatch='einsum' or "
                     "'index' with expert parallelism, or a mesh with expert=1.")
  model = DecoderOnly(config) if isinstance(config, DecoderOnlyConfig) else EncoderDecoder(config)
  optimizer, schedule = optimizer or optim.make_optimizer(train_config)
  # Shapes only: a batch-1 example would violate the batch split, so trace with the real batch shape.
  batch_shapes = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in example_batch.items()}
  dummy_batch = lambda: {k: jnp.ones(s.shape, s.dtype) for k, s in batch_shapes.items()}
  init_fn = lambda rng: step_lib.init_train_state(model, optimizer, rng, dummy_batch())
  with partitioner.context():
    boxed = jax.eval_shape(lambda: step_lib.init_variables(model, jax.random.PRNGKey(0), dummy_batch()))
    boxed_params = boxed["params"]
    abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_specs = partitioner.state_specs(abstract_state, boxed_params)   # raises on anything that won't split
  shardings = partitioner.shardings(state_specs)
  batch_sharding, replicated = partitioner.batch_sharding, partitioner.replicated

  # Two programs, parameters first and then the optimizer state around them (the fresh parameters donated):
  # one program holding both would keep the parameters' initialisation temporaries alive beside the optimizer
  # state (AdamW at 512 experts, resident after init: 18.6 bytes per parameter in one program, 13.1 in two).
  init_params = jax.jit(lambda rng: step_lib.init_params(model, rng, dummy_batch()),
                        out_shardings=shardings.params)
  start = functools.partial(step_lib.start_train_state, optimizer)
  start_donated = jax.jit(start, in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=(0,))
  init = lambda rng: start_donated(init_params(rng))
  init_from_params = jax.jit(start, in_shardings=(shardings.params,), out_shardings=shardings)
  train_step = jax.jit(
      functools.partial(step_lib.train_step, model=model, optimizer=optimizer, schedule=schedule,
                        z_loss_coef=train_config.z_loss_coef,
                        accumulation_steps=train_config.gradient_accumulation_steps,
                        distill=(train_config.distill_soft_weight, train_config.distill_temperature)),
      in_shardings=(shardings, batch_sharding, replicated), out_shardings=(shardings, replicated),
      donate_argnums=(0,), compiler_options=compiler_options(partitioner))
  eval_step = jax.jit(functools.partial(step_lib.eval_step, model=model),
                      in_shardings=(shardings.params, batch_sharding), out_shardings=replicated)

  def loss_and_grads(params, batch, rng, train):
    fn = functools.partial(step_lib.loss_and_metrics, model=model, z_loss_coef=train_config.z_loss_coef,
                           train=train)
    return jax.value_and_grad(fn, has_aux=True)(params, batch, rng)

  grads = jax.jit(loss_and_grads, static_argnums=(3,),
                  in_shardings=(shardings.params, batch_sharding, replicated),
                  out_shardings=((replicated, replicated), shardings.params))
  return Run(config, train_config, partitioner, model, optimizer, schedule, state_specs, boxed_params,
             init, init_from_params, train_step, eval_step, grads)

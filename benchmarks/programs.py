"""The programs the benchmarks time: a switchx training step through the real training path
(train/state.build on the device mesh: jit with shardings and buffer donation) and the same model as
transformers' PyTorch SwitchTransformers with torch's AdamW.

Each builder returns a zero-argument `step()` that runs one full step (forward, backward, optimizer update) and
blocks until it is done.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from flax import linen as nn

from switchx.config import ModelConfig, MoeConfig, TrainConfig
from switchx.parallel.mesh import MeshConfig, make_mesh
from switchx.parallel.partitioning import Partitioner
from switchx.train import state as state_lib

CAPACITY_FACTOR = 1.25


def case1_config(num_experts: int, dtype: str = "float32", dispatch: str = "index", group_size: int = 128,
                 sparse: bool = True, d_model: int = 256, d_ff: int = 1024, vocab_size: int = 32128,
                 num_layers: int = 4) -> ModelConfig:
  """The issue's case-1 model: vocab 32128, d_model 256, 4 heads x 64, d_ff 1024, 4+4 layers with layers 1 and 3
  of each stack sparse, top-1, capacity factor 1.25 (ReLU, tied logits, as the released Switch models)."""
  layout = "every:2" if sparse else "none"
  return ModelConfig(vocab_size=vocab_size, d_model=d_model, num_heads=4, head_dim=64, d_ff=d_ff,
                     num_encoder_layers=num_layers, num_decoder_layers=num_layers, activation="relu",
                     logits_via_embedding=True,
                     dtype=dtype, encoder_sparse=layout, decoder_sparse=layout,
                     moe=MoeConfig(num_experts=num_experts, group_size=group_size, dispatch=dispatch,
                                   train_capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=2.0,
                                   min_capacity=1, load_balance_loss_coef=0.01, router_z_loss_coef=0.001))


def batch(config: ModelConfig, batch_size: int, inputs_length: int, targets_length: int, seed: int = 0) -> dict:
  rng = np.random.RandomState(seed)
  targets = rng.randint(2, config.vocab_size, (batch_size, targets_length)).astype(np.int32)
  return {"encoder_input_tokens": rng.randint(2, config.vocab_size, (batch_size, inputs_length)).astype(np.int32),
          "decoder_input_tokens": np.concatenate([np.zeros((batch_size, 1), np.int32), targets[:, :-1]], 1),
          "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets, np.float32)}


def switchx_step(config: ModelConfig, host_batch: dict, optimizer: str = "adamw", moments: str = "float32"):
  """-> (step, number of parameters). The state is donated each step, as in `switchx train`. optimizer: a
  TrainConfig.optimizer, or "sgd" (plain optax.sgd, no state: the baseline that shows what AdamW costs);
  moments: TrainConfig.adam_moments_dtype.
  `step.lowered()` is the step lowered for its inputs (compile it for its HLO); `step.compiled()` the executable
  the step runs (for XLA's memory analysis)."""
  train = TrainConfig(optimizer="adamw" if optimizer == "sgd" else optimizer, learning_rate=1e-4,
                      schedule="constant", warmup_steps=0, batch_size=len(host_batch["encoder_input_tokens"]),
                      adam_moments_dtype=moments)
  sgd = (optax.sgd(1e-4), optax.constant_schedule(1e-4)) if optimizer == "sgd" else None
  run = state_lib.build(config, train, Partitioner(make_mesh(MeshConfig(), jax.devices()[:1])), host_batch, sgd)
  rng = jax.random.PRNGKey(1)
  run.compile_train_step(host_batch, rng)   # as `switchx train`: compiled before the state exists
  holder = {"state": run.init(jax.random.PRNGKey(0))}
  device_batch = run.shard_batch(host_batch)

  def step():
    holder["state"], metrics = run.train_step(holder["state"], device_batch, rng)
    jax.block_until_ready(metrics["loss"])

  step.lowered = lambda: run.lower_train_step(holder["state"], device_batch, rng)
  step.compiled = lambda: run.compiled_train_step   # the executable `step` runs
  num_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(holder["state"].params))
  return step, num_params


def hf_model(config: ModelConfig, expert_capacity: int):
  import torch
  import transformers
  from switchx.interop.hf import transformers_config
  fields = transformers_config(config, expert_capacity=expert_capacity)
  fields.pop("architectures")
  if config.is_sparse:
    hf_config = transformers.SwitchTransformersConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    model = transformers.SwitchTransformersForConditionalGeneration(hf_config)
  else:
    hf_config = transformers.T5Config(**{k: v for k, v in fields.items() if k != "model_type"})
    model = transformers.T5ForConditionalGeneration(hf_config)
  torch.manual_seed(0)
  return model


def hf_step(config: ModelConfig, host_batch: dict, expert_capacity: int, autocast: bool = False):
  """transformers' training step: forward with labels (+ router losses), backward, torch AdamW. autocast: the
  forward under torch.autocast("cpu", bfloat16) (float32 weights and optimizer; matmuls in bfloat16), what a
  PyTorch user with bfloat16 hardware runs."""
  import contextlib

  import torch
  model = hf_model(config, expert_capacity)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
  inputs = torch.from_numpy(host_batch["encoder_input_tokens"]).long()
  decoder_inputs = torch.from_numpy(host_batch["decoder_input_tokens"]).long()
  labels = torch.from_numpy(host_batch["decoder_target_tokens"]).long()
  router = config.is_sparse

  def step():
    optimizer.zero_grad(set_to_none=True)
    kwargs = {"output_router_logits": True} if router else {}
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
      loss = model(input_ids=inputs, decoder_input_ids=decoder_inputs, labels=labels, **kwargs).loss
    loss.backward()
    optimizer.step()

  return step


def hf_capacity(config: ModelConfig, inputs_length: int) -> int:
  """transformers routes each sequence with a fixed capacity: the per-sequence equivalent of factor 1.25."""
  return max(1, math.ceil(CAPACITY_FACTOR * inputs_length / config.moe.num_experts))


# --- case 4: greedy decoding ---------------------------------------------------------------------------------
def decode_programs(config: ModelConfig, encoder_tokens: np.ndarray, max_new_tokens: int, workdir: str):
  """-> ({name: step}, produced): switchx and transformers greedily decode the same model (switchx's random init
  exported to transformers with export_hf) for `max_new_tokens` tokens per row, with their KV caches.
  "switchx" decodes from the float32 parameters (cast to the model's dtype inside each call); where that dtype
  is not float32, "switchx serving" also decodes from decode.serving_params (the weights cast once, before
  timing, as `switchx decode` does). transformers decodes in float32 and under bfloat16 autocast ("transformers
  autocast"). transformers is told not to stop early (min_new_tokens); switchx stops only
  when every row has produced EOS, which a random model does not do (the benchmark checks the tokens it
  produced: produced[name] after a step has run)."""
  import torch
  import transformers

  from switchx import decode
  from switchx.config import DecodeConfig
  from switchx.interop.hf import export_hf
  from switchx.models.encoder_decoder import EncoderDecoder

  model = EncoderDecoder(config)
  dummy = np.zeros((1, 8), np.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), dummy, dummy)["params"])
  export_hf(config.replace(dtype="float32"), params, workdir, expert_capacity=encoder_tokens.shape[1])
  theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(workdir).eval()
  inputs = torch.from_numpy(encoder_tokens).long()
  mask = inputs != 0
  settings = DecodeConfig(strategy="greedy", max_decode_length=max_new_tokens)
  produced = {}

  def ours(name, weights):
    def step():
      result = decode.generate(config, weights, encoder_tokens, settings)
      produced[name] = np.asarray(jax.block_until_ready(result.tokens))
    return step

  def hf(name, autocast):
    def step():
      with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        produced[name] = theirs.generate(input_ids=inputs, attention_mask=mask, do_sample=False, num_beams=1,
                                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens).numpy()
    return step

  steps = {"switchx": ours("switchx", params)}
  if config.dtype != "float32":
    steps["switchx serving"] = ours("switchx serving", decode.serving_params(config, params))
  return steps | {"transformers": hf("transformers", False),
                  "transformers autocast": hf("transformers autocast", True)}, produced


# --- a phase profile: where a training step's time goes --------------------------------------------------------
def switchx_phases(config: ModelConfig, host_batch: dict) -> dict:
  """{phase: step()} for switchx: the loss alone (forward), its gradient (forward + backward) and the full
  training step (+ AdamW update), all jitted from the training path's own functions."""
  import functools

  from switchx.models.encoder_decoder import EncoderDecoder
  from switchx.train import step as step_lib

  full, _ = switchx_step(config, host_batch)
  model = EncoderDecoder(config)
  dummy = np.zeros((1, 8), np.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), dummy, dummy)["params"])
  batch = jax.device_put(host_batch)
  loss = functools.partial(step_lib.loss_and_metrics, model=model, z_loss_coef=1e-4, train=True)
  forward = jax.jit(lambda p, b, r: loss(p, b, r)[0])
  gradient = jax.jit(jax.grad(lambda p, b, r: loss(p, b, r)[0]))
  rng = jax.random.PRNGKey(1)
  return {"forward": lambda: jax.block_until_ready(forward(params, batch, rng)),
          "forward + backward": lambda: jax.block_until_ready(gradient(params, batch, rng)),
          "full step": full}


def hf_phases(config: ModelConfig, host_batch: dict, expert_capacity: int, autocast: bool = False) -> dict:
  """The same three phases for transformers (forward in training mode, + backward, + AdamW step); autocast: the
  forward under torch.autocast("cpu", bfloat16), as hf_step."""
  import contextlib

  import torch
  model = hf_model(config, expert_capacity)
  model.train()
  inputs = torch.from_numpy(host_batch["encoder_input_tokens"]).long()
  decoder_inputs = torch.from_numpy(host_batch["decoder_input_tokens"]).long()
  labels = torch.from_numpy(host_batch["decoder_target_tokens"]).long()
  kwargs = {"output_router_logits": True} if config.is_sparse else {}
  cast = lambda: torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

  def forward():
    with torch.no_grad(), cast():
      model(input_ids=inputs, decoder_input_ids=decoder_inputs, labels=labels, **kwargs)

  def backward():
    model.zero_grad(set_to_none=True)
    with cast():
      loss = model(input_ids=inputs, decoder_input_ids=decoder_inputs, labels=labels, **kwargs).loss
    loss.backward()

  return {"forward": forward, "forward + backward": backward,
          "full step": hf_step(config, host_batch, expert_capacity, autocast)}

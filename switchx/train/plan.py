"""`switchx plan`: per-device memory of a config on a mesh, from shapes and shardings alone.

No device is touched (jax.eval_shape and a device-less mesh description), so Switch-C-2048 on a 2048-device
mesh can be planned on a laptop. Parameters and optimizer state are exact (the same specs training uses);
activations are an estimate of what one training step keeps for the backward pass (formula below). A
decoder-only model (DecoderOnlyConfig) is planned for rows of inputs_length + targets_length tokens.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from switchx.config import DecoderOnlyConfig, ModelConfig, TrainConfig
from switchx.models.decoder_only import DecoderOnly
from switchx.models.encoder_decoder import EncoderDecoder
from switchx.moe.dispatch import dropless_block_size
from switchx.parallel.partitioning import Partitioner, abstract_mesh
from switchx.train import optim, step as step_lib


def shard_bytes(shape, dtype, spec, mesh_shape: dict[str, int]) -> int:
  """Bytes one device holds of an array with this PartitionSpec (dims are validated divisible)."""
  ways = 1
  for axes in spec:
    for axis in (() if axes is None else (axes,) if isinstance(axes, str) else axes):
      ways *= mesh_shape[axis]
  return math.prod(shape) * np.dtype(dtype).itemsize // ways


def activation_estimate(config: ModelConfig, train: TrainConfig, mesh_shape: dict[str, int]) -> int:
  """Bytes of activations one device keeps for the backward pass of one micro-batch (an estimate).

  Per token and layer: ~8 d_model-sized tensors (inputs, norms, q/k/v/out projections, residuals), the FFN
  hidden units (2x for gated activations) split over 'model', and attention probabilities (heads split over
  'model'); sparse layers add the dispatch and combine tensors [G, S, E, C] (the einsum path's O(S * E * C)
  cost) and the experts' hidden units for the k * capacity-factor slots of each token (dropless: for the
  slots of its blocks, plus the weights gathered for each block; ragged: each token's k rows). Logits [B, L, V]
  once.
  """
  model_ways = mesh_shape["model"]
  batch_ways = mesh_shape["data"] * mesh_shape["expert"]
  rows = train.batch_size // train.gradient_accumulation_steps // batch_ways
  act_bytes = np.dtype(config.dtype).itemsize
  hidden = 2 if config.activation.startswith("gated-") else 1
  moe = config.moe
  group = min(moe.group_size, max(rows, 1) * train.inputs_length)
  capacity = group if moe.dispatch == "dropless" else moe.capacity(group, train=True)  # dropless: see below

  def layer(tokens, keys, sparse):
    """keys: attention keys per query (encoder: Le; decoder: Ld self + Le cross)."""
    per_token = 8 * config.d_model + config.num_heads // model_ways * keys
    block = dropless_block_size(tokens, moe.top_k, moe.num_experts) if moe.dispatch == "dropless" else 0
    if sparse and block:  # the routed tokens in N blocks of b, each with its expert's weights gathered
      blocks = (tokens * moe.top_k + moe.num_experts * (block - 1)) // block
      gathered = blocks * config.d_model * config.expert_d_ff * (hidden + 1) * 4 / act_bytes  # float32 weights
      per_token += blocks * block / max(tokens, 1) * (config.expert_d_ff * hidden // model_ways + config.d_model)
      per_token += gathered / max(tokens, 1)
    elif sparse and moe.dispatch == "ragged":    # each token's k rows, sorted by expert: no padding, no gather
      per_token += moe.top_k * (config.expert_d_ff * hidden // model_ways + config.d_model)
    elif sparse and moe.dispatch == "dropless":  # few tokens per expert: a slot for each token of the group
      per_token += moe.num_experts * (config.expert_d_ff * hidden // model_ways + config.d_model)
    elif sparse:
      dispatch = 2 * moe.num_experts * capacity * 4          # bool mask + float32 combine weights
      slots = capacity * moe.num_experts / max(group, 1)    # expert slots per token (~ k * capacity factor)
      per_token += dispatch + slots * (config.expert_d_ff * hidden // model_ways + config.d_model)
    else:
      per_token += config.d_ff * hidden // model_ways
    return tokens * per_token

  if isinstance(config, DecoderOnlyConfig):   # one causal stack over rows of inputs + targets tokens
    length = train.inputs_length + train.targets_length
    tokens = rows * length
    total = sum(layer(tokens, length, i in config.sparse_layers) for i in range(config.num_layers))
    return int(total * act_bytes + tokens * config.vocab_size // model_ways * 4)
  enc_tokens, dec_tokens = rows * train.inputs_length, rows * train.targets_length
  total = sum(layer(enc_tokens, train.inputs_length, i in config.encoder_sparse_layers)
              for i in range(config.num_encoder_layers))
  total += sum(layer(dec_tokens, train.targets_length + train.inputs_length, i in config.decoder_sparse_layers)
               for i in range(config.num_decoder_layers))
  return int(total * act_bytes + dec_tokens * config.vocab_size // model_ways * 4)  # + float32 logits


def plan(config: ModelConfig, train: TrainConfig, mesh_shape: dict[str, int]) -> dict:
  """{'params_bytes', 'optimizer_bytes', 'activation_bytes', 'total_bytes'} per device, plus counts."""
  partitioner = Partitioner(abstract_mesh(mesh_shape))
  partitioner.check_batch(train.batch_size)
  config = config.replace(moe=dataclasses.replace(config.moe,
                                                  num_group_partitions=partitioner.num_batch_partitions))
  optimizer, _ = optim.make_optimizer(train)
  if isinstance(config, DecoderOnlyConfig):
    model = DecoderOnly(config)
    length = train.inputs_length + train.targets_length
    batch = lambda: {"decoder_input_tokens": jnp.ones((train.batch_size, length), jnp.int32)}
  else:
    model = EncoderDecoder(config)
    batch = lambda: {"encoder_input_tokens": jnp.ones((train.batch_size, train.inputs_length), jnp.int32),
                     "decoder_input_tokens": jnp.ones((train.batch_size, train.targets_length), jnp.int32)}
  boxed = jax.eval_shape(lambda: step_lib.init_variables(model, jax.random.PRNGKey(0), batch()))["params"]
  abstract = jax.eval_shape(lambda: step_lib.init_train_state(model, optimizer, jax.random.PRNGKey(0), batch()))
  specs = partitioner.state_specs(abstract, boxed)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)

  def total(tree, spec_tree):
    leaves = jax.tree_util.tree_leaves(tree)
    spec_leaves = jax.tree_util.tree_leaves(spec_tree, is_leaf=is_spec)
    return sum(shard_bytes(l.shape, l.dtype, s, mesh_shape) for l, s in zip(leaves, spec_leaves))

  params_bytes = total(abstract.params, specs.params)
  optimizer_bytes = total(abstract.opt_state, specs.opt_state)
  activation_bytes = activation_estimate(config, train, mesh_shape)
  return {"mesh": dict(mesh_shape), "devices": math.prod(mesh_shape.values()),
          "params_bytes": params_bytes, "optimizer_bytes": optimizer_bytes,
          "activation_bytes": activation_bytes,
          "total_bytes": params_bytes + optimizer_bytes + activation_bytes,
          "total_params": sum(math.prod(l.shape) for l in jax.tree_util.tree_leaves(abstract.params))}

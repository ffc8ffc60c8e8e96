"""Task-level routing for serving: a task's sub-network as a model of its own (and token routers made task routers).

    config_t, params_t = extract_task(config, params, task=2)   # only the experts task 2 uses, in every layer
    switchx.save(out_dir, config_t, params_t)                    # loads and decodes alone, with no task ids

With MoeConfig.route_by="task" (Kudugunta et al. 2021, "Beyond Distillation: Task-level Mixture-of-Experts",
arXiv 2110.03742) every token of task t takes the same top-k experts of a layer with the same gates: the softmax
of the layer's table row task_router[t] (as moe/routing.py computes them, router bias, normalize_gates and
routed_scaling_factor included). The extracted layer keeps just those k experts, each expert's output weights
`wo` scaled by k x its gate, and a one-row table of zeros, whose softmax gives each of the k experts gate 1/k: each
expert's contribution, so the layer's output, is what the full model computes for task t (the expert's output is
linear in wo). Its capacity factors are <= 0 (its k experts take every token), so when the full model drops no
token either (decoding's default, or eval_capacity_factor <= 0) the extracted model's logits are the full model's on
the task's inputs (tests/test_extract.py). The experts' weights shrink from E to k per layer; nothing else changes.

`task_router_params` starts task routing from a token-routed checkpoint (switchx finetune with
MoeConfig.route_by="task"): each layer's router kernel [D, E] gives way to a fresh table [num_tasks, E].
"""

from __future__ import annotations

import dataclasses

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from switchx.config import ModelConfig
from switchx.moe.routing import tokens_choose
from switchx.quantize import Quantized

EXPERT_OUTPUT = "wo"


def _moe_layers(flat: dict) -> list[tuple]:
  """Paths of the MoE layers (those with an "experts" subtree) in flattened parameters."""
  return sorted({path[:path.index("experts")] for path in flat if "experts" in path})


def task_experts(config: ModelConfig, table_row: np.ndarray, router_bias: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(experts [k], gates [k]) that a layer's routing gives every token of a task whose table row (logits [E]) is
  `table_row`: moe.routing.tokens_choose's own computation (float32), on one token."""
  moe = config.moe
  probs = jax.nn.softmax(jnp.asarray(table_row, jnp.float32)[None, None, :], axis=-1)     # [1, 1, E]
  bias = None if router_bias is None else jnp.asarray(router_bias, jnp.float32)
  decision = tokens_choose(probs, jnp.ones((1, 1), bool), k=moe.top_k, capacity=1,
                           normalize_gates=moe.normalize_gates, selection_bias=bias)
  gates = np.asarray(decision.gate[0, 0], np.float32) * np.float32(moe.routed_scaling_factor)
  return np.asarray(decision.expert_index[0, 0]), gates


def extract_task(config: ModelConfig, params, task: int) -> tuple[ModelConfig, dict]:
  """(config, params) of task `task`'s sub-network of a task-routed model (see the module doc)."""
  moe = config.moe
  if moe.route_by != "task":
    raise ValueError(f"extract_task needs a task-routed model (MoeConfig.route_by='task'); this one routes by "
                     f"{moe.route_by!r}, so every token may take any expert and there is no sub-network per task.")
  if not 0 <= task < moe.num_tasks:
    raise ValueError(f"task {task}: the model has tasks 0 .. {moe.num_tasks - 1} (each task's index in the "
                     "fine-tuning mixture it was trained on).")
  if any(isinstance(leaf, Quantized) for leaf in jax.tree_util.tree_leaves(
      params, is_leaf=lambda x: isinstance(x, Quantized))):
    raise ValueError("extract_task takes float parameters: extract the task first, then quantize the smaller model.")
  flat = {path: np.asarray(value) for path, value in flax.traverse_util.flatten_dict(params).items()}
  k = moe.top_k
  for layer in _moe_layers(flat):
    bias = flat.pop(layer + ("router_bias",), None)
    experts, gates = task_experts(config, flat[layer + ("task_router",)][task], bias)
    flat[layer + ("task_router",)] = np.zeros((1, k), np.float32)             # gate 1/k for each kept expert
    for path in [p for p in flat if p[:len(layer) + 1] == layer + ("experts",)]:
      kept = flat[path][experts]                                              # [k, ...]
      if path[-1] == EXPERT_OUTPUT:                                           # [k, F, D] x (k * gate)
        kept = kept * (k * gates).astype(np.float32)[:, None, None]
      flat[path] = kept.astype(np.float32)
  extracted = dataclasses.replace(moe, num_experts=k, num_tasks=1, routed_scaling_factor=1.0, normalize_gates=False,
                                  bias_balance_rate=0.0, train_capacity_factor=0.0, eval_capacity_factor=0.0,
                                  expert_capacity=None)
  return config.replace(moe=extracted), flax.traverse_util.unflatten_dict(flat)


def task_usage(config: ModelConfig, params) -> dict[str, list[list[int]]]:
  """{layer name: for each task, the experts it uses} (e.g. to see which tasks share experts)."""
  flat = flax.traverse_util.flatten_dict(params)
  usage = {}
  for layer in _moe_layers(flat):
    table = np.asarray(flat[layer + ("task_router",)])
    bias = flat.get(layer + ("router_bias",))
    usage["/".join(layer)] = [sorted(int(e) for e in task_experts(config, row, bias)[0]) for row in table]
  return usage


def task_router_params(params, num_tasks: int, seed: int = 0, stddev: float = 0.02) -> dict:
  """A token-routed model's parameters for the same model routed by task: each MoE layer's kernel "router" [D, E]
  replaced by a table "task_router" [num_tasks, E] drawn from N(0, stddev^2) (a fresh router's initialisation; the
  experts and everything else are kept)."""
  flat = dict(flax.traverse_util.flatten_dict(params))
  rng = np.random.default_rng(seed)
  layers = _moe_layers(flat)
  if not layers or any(layer + ("router",) not in flat for layer in layers):
    raise ValueError("task_router_params converts a token-routed MoE model: no MoE layer with a 'router' kernel.")
  for layer in layers:
    kernel = flat.pop(layer + ("router",))                                    # [D, E]
    flat[layer + ("task_router",)] = (stddev * rng.standard_normal((num_tasks, kernel.shape[-1]))).astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)

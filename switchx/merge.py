"""Expert merging for serving: E experts -> E' (fewer parameters in memory), the router untouched.

    groups = similar_experts(params, config, num_merged=4)             # by cosine similarity of the weights
    config4, params4 = merge_experts(config, params, groups, usage)    # usage-weighted averages, E' = 4

A merged layer keeps its router's E columns (routing decisions are made as before) and maps each router column
to the merged expert of its group (MoeConfig.expert_map): a token that chose expert i is served by expert
map[i] with the gate it had. So merging E -> E with every expert its own group changes nothing, and merging
experts that are identical changes nothing either (tests/test_merge.py); merging different experts replaces
each by its group's usage-weighted average (usage: the share of tokens each expert received on calibration data,
e.g. router metrics' expert_usage; uniform when not given). The router's columns stay E (D x E parameters,
negligible beside the experts'); capacity is computed for the E' merged experts.
"""

from __future__ import annotations

import dataclasses

import flax.traverse_util
import numpy as np

from switchx.config import ModelConfig


def _sparse_layers(params) -> dict[tuple[str, ...], dict]:
  """{path of a MoE layer: its parameter dict} (the layers with an "experts" subtree)."""
  flat = flax.traverse_util.flatten_dict(params)
  layers = sorted({path[:path.index("experts")] for path in flat if "experts" in path})
  return {layer: {path[len(layer):]: value for path, value in flat.items() if path[:len(layer)] == layer}
          for layer in layers}


def similar_experts(params, config: ModelConfig, num_merged: int) -> list[list[int]]:
  """Groups of the E experts (one grouping for every layer: MoeConfig.expert_map is per model) by agglomerative
  clustering on the cosine similarity of their weights, concatenated over layers: repeatedly join the two most
  similar groups (average linkage) until `num_merged` remain. Sorted by first member."""
  e = config.moe.num_experts
  if not 1 <= num_merged <= e:
    raise ValueError(f"num_merged={num_merged}: merge {e} experts into 1 .. {e} experts.")
  vectors = []
  for layer in _sparse_layers(params).values():
    weights = [np.asarray(v).reshape(e, -1) for path, v in sorted(layer.items()) if path[0] == "experts"]
    vectors.append(np.concatenate(weights, axis=1))
  x = np.concatenate(vectors, axis=1)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  similarity = x @ x.T                                                         # [E, E]
  groups = [[i] for i in range(e)]
  while len(groups) > num_merged:
    best, pair = -np.inf, None
    for a in range(len(groups)):
      for b in range(a + 1, len(groups)):
        score = similarity[np.ix_(groups[a], groups[b])].mean()
        if score > best:
          best, pair = score, (a, b)
    a, b = pair
    groups[a] = sorted(groups[a] + groups[b])
    del groups[b]
  return sorted(groups)


def merge_experts(config: ModelConfig, params, groups: list[list[int]], usage=None) -> tuple[ModelConfig, dict]:
  """(config with E' = len(groups) experts and the expert_map, params with merged experts). `groups` partition the
  current experts 0..E-1; usage [E] (or None: uniform) weights each group's average."""
  moe = config.moe
  e = moe.num_experts
  members = sorted(i for g in groups for i in g)
  if members != list(range(e)) or any(not g for g in groups):
    raise ValueError(f"groups {groups} must partition the {e} experts 0..{e - 1} into non-empty groups.")
  usage = np.ones(e) if usage is None else np.asarray(usage, np.float64)
  if usage.shape != (e,) or (usage < 0).any():
    raise ValueError(f"usage: expected {e} non-negative shares, got {usage.shape}.")
  group_of = np.zeros(e, np.int64)
  for g, group in enumerate(groups):
    group_of[group] = g
  weights = [usage[g] / usage[g].sum() if usage[g].sum() > 0 else np.full(len(g), 1 / len(g)) for g in groups]

  flat = flax.traverse_util.flatten_dict(params)
  for path, value in list(flat.items()):
    if "experts" in path:                                                     # [E, ...] -> [E', ...]
      value = np.asarray(value, np.float64)
      flat[path] = np.stack([np.tensordot(w, value[g], axes=1) for w, g in zip(weights, groups)]).astype(np.float32)
  previous = np.arange(e) if moe.expert_map is None else np.asarray(moe.expert_map)   # router column -> expert
  expert_map = tuple(int(group_of[i]) for i in previous)
  merged = dataclasses.replace(moe, num_experts=len(groups), expert_map=expert_map)
  return config.replace(moe=merged), flax.traverse_util.unflatten_dict(flat)

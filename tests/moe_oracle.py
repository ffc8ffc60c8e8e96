"""A naive MoE layer in numpy, written independently of switchx.moe: loops over tokens and experts.

It is the oracle for every dispatch path: same semantics (groups, capacity, priority, gates), no cleverness.
"""

import math

import numpy as np


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _act(name, x):
  base = name.removeprefix("gated-")
  if base == "relu":
    return np.maximum(x, 0)
  if base == "gelu":
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  return x / (1 + np.exp(-x))  # silu


def expert_ffn(x, params, e, activation):
  """One expert applied to one token vector x [D]."""
  if activation.startswith("gated-"):
    h = _act(activation, x @ params["wi_0"][e]) * (x @ params["wi_1"][e])
  else:
    h = _act(activation, x @ params["wi"][e])
  return h @ params["wo"][e]


def capacity(cf, k, group_size, num_experts, min_capacity):
  if cf <= 0:
    return group_size
  return min(max(math.ceil(cf * k * group_size / num_experts), min_capacity), group_size)


def oracle_moe(x, mask, params, *, activation, num_groups, router="tokens_choose", k=1, cf=1.25,
               min_capacity=1, normalize_gates=False, batch_prioritized=False):
  """x [T, D] float64, mask [T] bool -> y [T, D], kept [T, k] (which choices were served).

  Tokens are split into num_groups consecutive groups. tokens_choose: rank 0 of all tokens claims slots first,
  then rank 1, ...; within a rank, sequence order (or descending router confidence with batch_prioritized).
  experts_choose: each expert takes its C most probable real tokens of the group.
  """
  router_w = params["router"]
  num_tokens, d_model = x.shape
  num_experts = router_w.shape[1]
  size = num_tokens // num_groups
  y = np.zeros_like(x)
  kept = np.zeros((num_tokens, k), bool)
  for g in range(num_groups):
    idx = range(g * size, (g + 1) * size)
    probs = _softmax(x[g * size:(g + 1) * size] @ router_w)            # [S, E]
    if router == "experts_choose":
      c = capacity(cf, 1, size, num_experts, min_capacity)
      for e in range(num_experts):
        candidates = [s for s in range(size) if mask[idx[s]]]
        candidates.sort(key=lambda s: -probs[s, e])
        for s in candidates[:c]:
          y[idx[s]] += probs[s, e] * expert_ffn(x[idx[s]], params, e, activation)
          kept[idx[s], 0] = True
      continue
    c = capacity(cf, k, size, num_experts, min_capacity)
    choices = np.argsort(-probs, axis=-1, kind="stable")[:, :k]          # [S, k]
    gates = np.take_along_axis(probs, choices, -1)
    if normalize_gates:
      gates = gates / gates.sum(-1, keepdims=True)
    order = list(range(size))
    if batch_prioritized:
      order.sort(key=lambda s: -(probs[s].max() if mask[idx[s]] else -1.0))
    load = np.zeros(num_experts, int)
    for rank in range(k):
      for s in order:
        if not mask[idx[s]]:
          continue
        e = choices[s, rank]
        if load[e] < c:
          load[e] += 1
          kept[idx[s], rank] = True
          y[idx[s]] += gates[s, rank] * expert_ffn(x[idx[s]], params, e, activation)
  return y, kept

"""The MoE layer: routing invariants (hypothesis), the naive oracle, einsum == index for outputs and gradients,
losses, selective precision, jitter, and construction errors."""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moe_oracle import oracle_moe
from switchx.config import ModelConfig, MoeConfig
from switchx.moe.dispatch import dropless_block_size, sorted_blocks
from switchx.moe.experts import expert_compute_dtype, expert_matmul
from switchx.moe.layer import MoeLayer, group_shape, router_stats
from switchx.moe.routing import experts_choose, tokens_choose

D_MODEL, D_FF = 8, 16


def layer_config(activation="gated-gelu", dtype="float32", **moe) -> ModelConfig:
  moe.setdefault("num_experts", 4)
  moe.setdefault("min_capacity", 1)
  return ModelConfig(vocab_size=8, d_model=D_MODEL, num_heads=1, head_dim=4, d_ff=D_FF, num_encoder_layers=1,
                     num_decoder_layers=0, activation=activation, dtype=dtype, encoder_sparse="all",
                     moe=MoeConfig(**moe))


@functools.lru_cache(maxsize=None)
def _jitted_layer(config: ModelConfig, train: bool):
  layer = MoeLayer.for_model(config)

  def run(params, x, mask, rngs):
    (y, aux), state = layer.apply({"params": params}, x, mask, train, rngs=rngs, mutable=["intermediates"])
    return y, aux, state["intermediates"]

  return jax.jit(run)


def run_layer(config, params, x, mask, train=False, rngs=None):
  return _jitted_layer(config, train)(params, x, mask, rngs)


def init_layer(config, x, seed=0):
  params = MoeLayer.for_model(config).init(jax.random.PRNGKey(seed), x, jnp.ones(x.shape[:2], bool), False)["params"]
  return nn.unbox(params)


def random_inputs(seed, batch, length, pad_fraction=0.2):
  rng = np.random.RandomState(seed)
  x = rng.normal(size=(batch, length, D_MODEL)).astype(np.float32)
  mask = rng.uniform(size=(batch, length)) >= pad_fraction
  return jnp.asarray(x), jnp.asarray(mask)


# --- routing invariants on random router probabilities ------------------------------------------------------
@st.composite
def routing_problems(draw):
  num_experts = draw(st.integers(1, 6))
  k = draw(st.integers(1, min(2, num_experts)))
  groups, size = draw(st.integers(1, 3)), draw(st.integers(1, 12))
  seed = draw(st.integers(0, 2 ** 16))
  rng = np.random.RandomState(seed)
  logits = rng.normal(size=(groups, size, num_experts)) * draw(st.sampled_from([0.1, 1.0, 4.0]))
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1))
  mask = rng.uniform(size=(groups, size)) >= draw(st.sampled_from([0.0, 0.3]))
  cf = draw(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1.25, 2.0]))
  min_cap = draw(st.integers(0, 2))
  cap = MoeConfig(num_experts=num_experts, top_k=k, train_capacity_factor=cf, min_capacity=min_cap).capacity(
      size, train=True)
  return dict(probs=probs, mask=mask, k=k, capacity=cap, cf=cf, bpr=draw(st.booleans()),
              normalize=draw(st.booleans()))


@settings(max_examples=20)
@given(routing_problems())
def test_tokens_choose_invariants(p):
  probs, mask, k, cap = p["probs"], p["mask"], p["k"], p["capacity"]
  d = tokens_choose(jnp.asarray(probs), jnp.asarray(mask), k=k, capacity=cap, batch_prioritized=p["bpr"],
                    normalize_gates=p["normalize"])
  expert, slot, kept, gate = map(np.asarray, (d.expert_index, d.slot, d.kept, d.gate))
  groups, size, num_experts = probs.shape

  assert not kept[~mask].any(), "padding was routed"
  for g in range(groups):
    for e in range(num_experts):
      slots = slot[g][kept[g] & (expert[g] == e)]
      assert len(slots) <= cap, "an expert received more than C tokens"
      assert sorted(slots) == list(range(len(slots))), "slots are not 0..n-1 without repeats"
      # Priority: first choices before second choices; within a rank in priority order.
      routed = [(r, s) for r in range(k) for s in range(size) if mask[g, s] and expert[g, s, r] == e]
      if p["bpr"]:
        confidence = np.where(mask[g], probs[g].max(-1), -1.0)
        position = {s: i for i, s in enumerate(np.argsort(-confidence, kind="stable"))}
        routed.sort(key=lambda rs: (rs[0], position[rs[1]]))
      for i, (r, s) in enumerate(routed):
        assert kept[g, s, r] == (i < cap), "a later arrival was kept before an earlier one"
        if kept[g, s, r]:
          assert slot[g, s, r] == i

  assert (gate >= 0).all()
  assert (gate.sum(-1) <= 1 + 1e-6).all(), "a token's combine weights sum above 1"
  dispatch, combine = map(np.asarray, d.dense(num_experts, cap))
  assert (combine >= 0).all() and (combine.sum((2, 3)) <= 1 + 1e-6).all()
  assert (dispatch.sum((1,)) <= 1).all(), "two tokens share one expert slot"
  if p["cf"] <= 0:
    assert kept[mask].all(), "capacity_factor <= 0 must drop nothing"


@given(routing_problems())
def test_experts_choose_invariants(p):
  probs, mask = p["probs"], p["mask"]
  groups, size, num_experts = probs.shape
  cap = MoeConfig(num_experts=num_experts, router="experts_choose", train_capacity_factor=p["cf"],
                  min_capacity=1).capacity(size, train=True)
  d = experts_choose(jnp.asarray(probs), jnp.asarray(mask), capacity=cap)
  token, valid, gate = map(np.asarray, (d.token_index, d.valid, d.gate))
  assert token.shape == (groups, num_experts, cap)
  for g in range(groups):
    for e in range(num_experts):
      chosen = token[g, e][valid[g, e]]
      assert mask[g, chosen].all() and len(set(chosen)) == len(chosen)
      real = np.flatnonzero(mask[g])
      best = real[np.argsort(-probs[g, real, e], kind="stable")][:cap]
      assert set(chosen) == set(best), "an expert did not take its most probable tokens"
  dispatch, combine = map(np.asarray, d.dense(num_experts, cap))
  assert (combine >= 0).all() and (combine.sum((2, 3)) <= 1 + 1e-6).all()


def test_capacity_formula_and_group_shape():
  moe = MoeConfig(num_experts=8, top_k=2, train_capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4)
  assert moe.capacity(1024, train=True) == math.ceil(1.25 * 2 * 1024 / 8) == 320
  assert moe.capacity(1024, train=False) == 512
  assert moe.capacity(8, train=True) == 4                       # min_capacity wins
  assert moe.capacity(3, train=True) == 3                       # never above the group size
  assert MoeConfig(num_experts=8, train_capacity_factor=0.0).capacity(64, train=True) == 64
  assert MoeConfig(num_experts=8, expert_capacity=5).capacity(64, train=True) == 5
  assert group_shape(4096, 1024) == (4, 1024)
  assert group_shape(24, 16) == (2, 12)                        # largest size <= 16 that divides 24
  assert group_shape(6, 4, num_partitions=3) == (3, 2)
  with pytest.raises(ValueError, match="batch shards"):
    group_shape(10, 4, num_partitions=4)


# --- the layer against the naive oracle; einsum == index ----------------------------------------------------
LAYER_CASES = [
    dict(router="tokens_choose", top_k=1, train_capacity_factor=1.0),
    dict(router="tokens_choose", top_k=1, train_capacity_factor=0.5, batch_prioritized=True),
    dict(router="tokens_choose", top_k=2, train_capacity_factor=1.0, normalize_gates=True),
    dict(router="tokens_choose", top_k=2, train_capacity_factor=0.0),
    dict(router="experts_choose", train_capacity_factor=1.0),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("activation", ["gated-gelu", "relu"])
def test_layer_matches_naive_oracle(case, activation):
  x, mask = random_inputs(1, batch=2, length=12)
  outputs = {}
  for dispatch in ("einsum", "index"):
    config = layer_config(activation, group_size=8, eval_capacity_factor=case["train_capacity_factor"],
                          dispatch=dispatch, **case)
    params = init_layer(config, x)
    y, aux, _ = run_layer(config, params, x, mask)
    outputs[dispatch] = np.asarray(y).reshape(-1, D_MODEL)
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  flat = {"router": p64["router"], **p64["experts"]}
  expected, kept = oracle_moe(np.asarray(x, np.float64).reshape(-1, D_MODEL), np.asarray(mask).reshape(-1), flat,
                              activation=activation, num_groups=3, router=case["router"],
                              k=case.get("top_k", 1), cf=case["train_capacity_factor"], min_capacity=1,
                              normalize_gates=case.get("normalize_gates", False),
                              batch_prioritized=case.get("batch_prioritized", False))
  for dispatch, y in outputs.items():
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-6, err_msg=dispatch)
  # A token with no expert slot gets exactly zero: the residual alone carries it.
  unserved = ~kept.any(-1)
  for y in outputs.values():
    assert (y[unserved] == 0).all()
  if case["train_capacity_factor"] > 0:
    assert unserved[np.asarray(mask).reshape(-1)].any(), "the case should drop some tokens"


@settings(max_examples=4)  # each example compiles two gradients; the fixed LAYER_CASES cover every router
@given(num_experts=st.integers(2, 5), k=st.integers(1, 2), length=st.integers(2, 9),
       router=st.sampled_from(["tokens_choose", "experts_choose"]), cf=st.sampled_from([0.0, 0.75, 1.5]),
       bpr=st.booleans(), seed=st.integers(0, 1000))
def test_einsum_and_index_paths_agree_on_outputs_and_gradients(num_experts, k, length, router, cf, bpr, seed):
  if router == "experts_choose":
    k, bpr = 1, False
  x, mask = random_inputs(seed, batch=2, length=length)
  results = []
  for dispatch in ("einsum", "index"):
    config = layer_config(num_experts=num_experts, top_k=k, router=router, train_capacity_factor=cf,
                          eval_capacity_factor=cf, batch_prioritized=bpr, group_size=length, dispatch=dispatch)
    params = init_layer(config, x, seed=1)

    def loss(params, x):
      y, aux, _ = run_layer(config, params, x, mask)
      return jnp.sum(jnp.sin(y)) + aux["load_balance_loss"] + aux["router_z_loss"]

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
    results.append((value, grads))
  (v1, g1), (v2, g2) = results
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- dropless dispatch: every routed token, sorted by expert into blocks ---------------------------------------
def test_dropless_block_size_follows_the_mean_load_where_blocks_pay():
  assert dropless_block_size(1024, 1, 8) == 128      # an encoder pass: 128 tokens per expert
  assert dropless_block_size(4096, 1, 8) == 128      # capped: expert_matmul's fixed layouts
  assert dropless_block_size(1000, 1, 8) == 64       # largest power of two <= 125
  assert dropless_block_size(1024, 1, 512) == 2      # many experts: E*T slots would be 512x the tokens
  assert dropless_block_size(8, 1, 8) == 0           # a decoding step: a slot per token reads each expert once
  assert dropless_block_size(64, 2, 8) == 0


@settings(max_examples=25)
@given(routing_problems(), st.sampled_from([1, 2, 4, 8]))
def test_dropless_blocks_hold_every_routed_choice_once_each_block_one_expert(p, block):
  probs, mask, k = jnp.asarray(p["probs"]), jnp.asarray(p["mask"]), p["k"]
  groups, size, num_experts = probs.shape
  d = tokens_choose(probs, mask, k=k, capacity=size)
  slot_token, slot_gate, block_expert = map(np.asarray, sorted_blocks(d, num_experts, block))
  num_tokens = groups * size
  assert slot_token.shape == ((num_tokens * k + num_experts * (block - 1)) // block, block)
  assert (np.diff(block_expert) >= 0).all()                                  # sorted by expert
  served = {}
  for n, j in zip(*np.nonzero(slot_token < num_tokens)):
    key = (int(slot_token[n, j]), int(block_expert[n]))                       # (token, the block's expert)
    assert key not in served, "a choice placed twice"
    served[key] = float(slot_gate[n, j])
  assert (slot_gate[slot_token == num_tokens] == 0).all()                     # empty slots carry nothing
  expert, routed, gate = (np.asarray(a).reshape(num_tokens, k) for a in (d.expert_index, d.routed, d.gate))
  expected = {(t, int(expert[t, r])): float(gate[t, r]) for t in range(num_tokens) for r in range(k)
              if routed[t, r]}
  assert served == expected


def _dropless_against_references(dispatch, case, length, seed):
  """Runs a `dispatch` layer with nothing dropped beside the einsum path (capacity = a whole group) and the naive
  float64 oracle, asserting outputs and gradients agree. -> (aux, oracle's kept mask, x, mask, config, params)."""
  k, experts, activation = case["top_k"], case["experts"], case["activation"]
  x, mask = random_inputs(seed, batch=4, length=length)
  x = x.at[..., 0].add(case["skew"])                                 # a biased input skews the routing
  configs = {d: layer_config(activation, num_experts=experts, top_k=k, group_size=2 * length, dispatch=d,
                             train_capacity_factor=0.0, eval_capacity_factor=0.0,
                             num_group_partitions=case.get("parts", 1)) for d in ("einsum", dispatch)}
  params = init_layer(configs[dispatch], x)
  params["router"] = params["router"].at[0].add(case["skew"])

  def loss(config, params, x):
    y, aux, _ = run_layer(config, params, x, mask)
    return jnp.sum(jnp.sin(y)) + aux["load_balance_loss"] + aux["router_z_loss"], (y, aux)

  results = {d: jax.value_and_grad(functools.partial(loss, c), argnums=(0, 1), has_aux=True)(params, x)
             for d, c in configs.items()}
  (_, (y, aux)), grads = results[dispatch]
  (_, (y_ref, _)), grads_ref = results["einsum"]
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  expected, kept = oracle_moe(np.asarray(x, np.float64).reshape(-1, D_MODEL), np.asarray(mask).reshape(-1),
                              {"router": p64["router"], **p64["experts"]}, activation=activation, num_groups=2,
                              k=k, cf=0.0)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D_MODEL), expected, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-6)
  assert (np.asarray(y).reshape(-1, D_MODEL)[~np.asarray(mask).reshape(-1)] == 0).all()   # padding: exactly 0
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  return aux, kept, x, mask, configs[dispatch], params


@pytest.mark.parametrize("case", [
    dict(top_k=1, experts=4, activation="relu", length=64, skew=0.0, block=64),     # 256 tokens, 64 per expert
    dict(top_k=2, experts=8, activation="gated-gelu", length=64, skew=0.0, block=64),
    dict(top_k=1, experts=4, activation="relu", length=64, skew=3.0, block=64),     # most tokens on one expert
    dict(top_k=1, experts=4, activation="relu", length=6, skew=0.0, block=0),       # 6 per expert: slots
    dict(top_k=2, experts=8, activation="gated-gelu", length=3, skew=0.0, block=0),  # gates of 2 experts add
    dict(top_k=1, experts=4, activation="relu", length=128, skew=0.0, block=64, parts=2),  # 2 batch shards
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dropless_equals_the_oracle_without_drops_in_outputs_and_gradients(case):
  """dropless == the naive oracle at capacity factor 0 (nothing dropped), and == the einsum path with a
  capacity that holds a whole group, for outputs and for gradients of every parameter and of the input."""
  k, experts, length, parts = case["top_k"], case["experts"], case["length"], case.get("parts", 1)
  aux, kept, x, mask, config, params = _dropless_against_references("dropless", case, length, seed=7)
  assert float(aux["dropped_fraction"]) == 0.0 and kept[np.asarray(mask).reshape(-1)].all()
  if case["skew"]:
    usage = np.asarray(aux["expert_usage"])
    assert usage.max() > 0.6, usage     # the case really is lopsided
  expert_inputs = run_layer(config, params, x, mask)[2]["expert_inputs"][0]
  b, num_tokens = case["block"], 4 * length // parts              # tokens per shard
  if b:                                 # [P*N, 1, b, D]: the blocks, N = (T*K + E*(b-1)) // b per shard
    assert expert_inputs.shape == (parts * ((num_tokens * k + experts * (b - 1)) // b), 1, b, D_MODEL)
  else:                                 # [E, G, S, D]: every expert computes every token of its group
    assert expert_inputs.shape == (experts, 2, 2 * length, D_MODEL)


@pytest.mark.parametrize("case", [
    dict(top_k=1, experts=4, activation="relu", skew=0.0, parts=1),
    dict(top_k=2, experts=8, activation="gated-gelu", skew=0.0, parts=1),
    dict(top_k=1, experts=4, activation="relu", skew=3.0, parts=1),               # most tokens on one expert
    dict(top_k=2, experts=4, activation="relu", skew=0.0, parts=2),               # 2 batch shards
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_ragged_equals_the_oracle_without_drops_in_outputs_and_gradients(case):
  """dispatch='ragged' (grouped matmuls, jax.lax.ragged_dot) == the naive oracle with nothing dropped, and == the
  einsum path with a capacity that holds a whole group, in outputs and in every gradient; padding gets 0."""
  length = 32
  _, _, x, mask, config, params = _dropless_against_references("ragged", case, length, seed=9)
  expert_inputs = run_layer(config, params, x, mask)[2]["expert_inputs"][0]
  assert expert_inputs.shape == (case["parts"], 1, 4 * length * case["top_k"] // case["parts"], D_MODEL)  # no padding


def test_sorted_rows_runs_each_experts_choices_in_sequence_order_unrouted_last():
  from switchx.moe.dispatch import sorted_rows
  from switchx.moe.routing import TokenChoice
  expert = jnp.asarray([[[2], [0], [2], [1], [0]]], jnp.int32)                  # [G=1, S=5, K=1]
  routed = jnp.asarray([[[True], [True], [False], [True], [True]]])
  decision = TokenChoice(expert_index=expert, slot=jnp.zeros_like(expert), gate=jnp.arange(5.0).reshape(1, 5, 1),
                         routed=routed, kept=routed)
  slot_token, slot_gate, sizes = sorted_rows(decision, 3)
  assert sizes.tolist() == [2, 1, 1]
  assert slot_token.tolist() == [1, 4, 3, 0, 5]                                 # expert 0: 1, 4; 1: 3; 2: 0; empty
  assert slot_gate.tolist() == [1.0, 4.0, 3.0, 0.0, 0.0]


def test_dropless_config_errors():
  with pytest.raises(ValueError, match="dropless"):
    MoeConfig(dispatch="dropless", router="experts_choose")
  with pytest.raises(ValueError, match="dropless"):
    MoeConfig(dispatch="dropless", semantics="transformers", expert_capacity=4)
  with pytest.raises(ValueError, match="ragged"):
    MoeConfig(dispatch="ragged", router="experts_choose")


# --- the expert matmul's hand-written backward -----------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 3, 16, 200])   # 200: above FIXED_LAYOUT_MAX_TOKENS, the plain einsum
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_expert_matmul_equals_einsum_in_value_and_gradients(tokens, dtype):
  """expert_matmul's custom VJP (fixed dot layouts) against autodiff of the plain einsum, inside a small
  two-matmul FFN so the input gradient of the second product feeds the weight gradient of the first."""
  rng = np.random.RandomState(tokens)
  x = jnp.asarray(rng.normal(size=(5, tokens, 6)), jnp.float32)                    # [E, T, I]
  wi = jnp.asarray(rng.normal(size=(5, 6, 7)) * 0.3, jnp.float32)                # [E, I, O]
  wo = jnp.asarray(rng.normal(size=(5, 7, 6)) * 0.3, jnp.float32)
  target = jnp.asarray(rng.normal(size=(5, tokens, 6)), jnp.float32)

  def reference(x, wi, wo):  # float32 einsums on the operands rounded to `dtype`, as the fast path rounds them
    r = lambda a: a.astype(dtype).astype(jnp.float32)
    h = jax.nn.relu(r(jnp.einsum("eti,eio->eto", r(x), r(wi), precision="highest")))
    return jnp.einsum("eti,eio->eto", h, r(wo), precision="highest")

  def fast(x, wi, wo):
    return expert_matmul(jax.nn.relu(expert_matmul(x, wi, dtype)), wo, dtype).astype(jnp.float32)

  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a) - target))
  (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(loss(f), argnums=(0, 1, 2)))(x, wi, wo)
                        for f in (fast, reference))
  tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=3e-2, atol=3e-2)
  np.testing.assert_allclose(v1, v2, **tol)
  # Not differentiated (inference), the product takes the plain einsum's layout: the same values.
  np.testing.assert_allclose(jax.jit(fast)(x, wi, wo), jax.jit(reference)(x, wi, wo), **tol)
  for name, a, b in zip(("x", "wi", "wo"), g1, g2):
    assert a.dtype == jnp.float32, name   # weight gradients come back in the parameters' dtype
    np.testing.assert_allclose(a, b, err_msg=name, **tol)


# --- losses --------------------------------------------------------------------------------------------------
def _routing_logits(groups, size, num_experts, k, crowded):
  """Token s prefers expert s % E (then (s+1) % E, ...), except the first `crowded` tokens of each group,
  whose first choice is expert 0. crowded = 0 is perfectly uniform routing: f_e = k/E and P_e = 1/E."""
  s = np.arange(size)
  first = np.where(s < crowded, 0, s % num_experts)
  logits = np.zeros((groups, size, num_experts))
  for rank in range(k):
    logits[:, s, (first + rank) % num_experts] = 3.0 / (rank + 1)
  return jnp.asarray(logits, jnp.float32)


@pytest.mark.parametrize("k", [1, 2])
def test_load_balance_loss_is_k_when_uniform_and_grows_with_imbalance(k):
  groups, size, num_experts = 2, 16, 4
  mask = jnp.ones((groups, size), bool)

  def balance(logits):
    probs = jax.nn.softmax(logits, -1)
    decision = tokens_choose(probs, mask, k=k, capacity=size)
    return float(router_stats(logits, probs, mask, decision, num_experts)["load_balance_loss"])

  assert balance(_routing_logits(groups, size, num_experts, k, crowded=0)) == pytest.approx(k, abs=1e-5)
  values = [balance(_routing_logits(groups, size, num_experts, k, crowded=c)) for c in (4, 8, 12, 16)]
  assert all(a < b for a, b in zip([k] + values, values)), values
  assert values[-1] > 1.5 * k  # everyone's first choice on one expert is far from the floor


def test_layer_losses_from_raw_logits_and_model_sum():
  config = layer_config(router_z_loss_coef=1e-3)
  x, mask = random_inputs(3, batch=2, length=8)
  params = init_layer(config, x)
  y, aux, inter = run_layer(config, params, x, mask)
  logits = np.asarray(inter["router_logits"][0], np.float64).reshape(-1, 4)
  real = np.asarray(mask).reshape(-1)
  lse = np.log(np.exp(logits).sum(-1))
  assert float(aux["router_z_loss"]) == pytest.approx(np.mean(lse[real] ** 2), rel=1e-5)
  # Shifting all logits by a constant leaves the probabilities (and routing) alone but changes the z-loss.
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1)
  shifted = router_stats(jnp.asarray(logits + 5.0, jnp.float32).reshape(2, 8, 4), probs.reshape(2, 8, 4),
                         mask.reshape(2, 8), tokens_choose(probs.reshape(2, 8, 4), mask.reshape(2, 8), k=1,
                                                           capacity=8), 4)
  assert float(shifted["router_z_loss"]) > float(aux["router_z_loss"]) + 10
  assert 0 <= float(aux["dropped_fraction"]) <= 1 and aux["expert_usage"].shape == (4,)
  assert float(aux["expert_usage"].sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("dispatch", ["einsum", "index", "dropless", "ragged"])
def test_bfloat16_model_routes_in_float32_and_differentiates(dispatch):
  config = layer_config(dtype="bfloat16", dispatch=dispatch)
  x, mask = random_inputs(4, batch=4, length=64)   # 256 tokens, 4 experts: dropless runs in blocks
  params = init_layer(config, x)
  y, aux, inter = run_layer(config, params, x.astype(jnp.bfloat16), mask)
  assert inter["router_logits"][0].dtype == jnp.float32
  assert inter["expert_inputs"][0].dtype == jnp.bfloat16 and y.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  # The backward pass compiles and runs on the CPU (XLA rejects some bf16 dot layouts; see moe/dispatch.py).
  grads = jax.grad(lambda p: run_layer(config, p, x.astype(jnp.bfloat16), mask)[0].astype(jnp.float32).sum())(
      params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("setting,model,tokens,train,on_cpu", [
    ("auto", "bfloat16", 32, True, "float32"),      # training, few tokens per expert: float32 on the CPU
    ("auto", "bfloat16", 128, True, "bfloat16"),    # enough tokens for the matrix units
    ("auto", "bfloat16", 8, False, "bfloat16"),     # inference (decoding hoists the weights' cast)
    ("auto", "float32", 512, True, "float32"),
    ("bfloat16", "bfloat16", 8, True, "bfloat16"),  # an explicit setting is obeyed
    ("float32", "bfloat16", 512, False, "float32"),
])
def test_expert_compute_dtype_policy(setting, model, tokens, train, on_cpu):
  expected = on_cpu if jax.default_backend() == "cpu" or setting != "auto" else model
  assert expert_compute_dtype(setting, jnp.dtype(model), tokens, train) == jnp.dtype(expected)


def test_bfloat16_model_trains_few_token_experts_in_float32_on_cpu():
  """expert_dtype="auto" changes only the experts' dots: in training they take float32 operands on the CPU
  (bfloat16 with an explicit setting), activations still enter and leave in bfloat16, and the two agree."""
  x, mask = random_inputs(5, batch=2, length=16)      # 32 tokens, 4 experts: a few tokens per expert
  outputs = {}
  for setting in ("auto", "bfloat16"):
    config = layer_config(dtype="bfloat16", dispatch="index", expert_dtype=setting)
    params = init_layer(config, x)
    loss = lambda p: run_layer(config, p, x.astype(jnp.bfloat16), mask, train=True)[0].astype(jnp.float32).sum()
    stablehlo = jax.jit(jax.grad(loss)).lower(params).as_text()
    weights = rf"tensor<4x({D_MODEL}x{D_FF}|{D_FF}x{D_MODEL})x(f32|bf16)>"
    expert_dots = re.findall(rf"stablehlo\.dot_general.*: \((tensor<[^>]*>), {weights}\)", stablehlo)
    operand_types = {lhs.rsplit("x", 1)[1] for lhs, *_ in expert_dots}
    assert expert_dots and operand_types == ({"f32>"} if setting == "auto" and jax.default_backend() == "cpu"
                                             else {"bf16>"}), (setting, expert_dots)
    y, _, inter = run_layer(config, params, x.astype(jnp.bfloat16), mask, train=True)
    assert y.dtype == jnp.bfloat16 and inter["expert_inputs"][0].dtype == jnp.bfloat16
    outputs[setting] = np.asarray(y, np.float32)
  np.testing.assert_allclose(outputs["auto"], outputs["bfloat16"], atol=0.05 * np.abs(outputs["bfloat16"]).max())


def test_jitter_changes_routing_only():
  x, mask = random_inputs(5, batch=2, length=16, pad_fraction=0.0)
  plain = layer_config(group_size=32, train_capacity_factor=0.0)
  jittery = layer_config(group_size=32, train_capacity_factor=0.0, jitter_noise=0.9)
  params = init_layer(plain, x)
  params["router"] = params["router"] * 50  # make routing decisive so we can see jitter flip it
  rngs = {"jitter": jax.random.PRNGKey(7)}
  _, _, base = run_layer(plain, params, x, mask, train=True, rngs=rngs)
  _, _, jit = run_layer(jittery, params, x, mask, train=True, rngs=rngs)
  # Routing changed ...
  assert not np.allclose(base["router_logits"][0], jit["router_logits"][0])
  # ... but every expert input slot still holds an exact, un-noised token vector (or zeros).
  rows = np.asarray(jit["expert_inputs"][0]).reshape(-1, D_MODEL)
  tokens = np.asarray(x).reshape(-1, D_MODEL)
  for row in rows:
    assert not row.any() or (tokens == row).all(-1).any()
  moved = np.asarray(base["expert_inputs"][0]) != np.asarray(jit["expert_inputs"][0])
  assert moved.any(), "jitter of 0.9 on a decisive router should move some token"


def test_random_second_expert_policy_keeps_in_proportion_to_gate():
  probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (8, 256, 4)) * 2, -1)
  mask = jnp.ones(probs.shape[:2], bool)
  d = tokens_choose(probs, mask, k=2, capacity=256, second_expert_policy="random",
                    second_expert_threshold=0.2, rng=jax.random.PRNGKey(1))
  top2 = jax.lax.top_k(probs, 2)[0]
  relative2 = top2[..., 1] / top2.sum(-1)
  expected = float(jnp.minimum(1.0, relative2 / 0.2).mean())
  kept_second = float(d.routed[..., 1].mean())
  assert kept_second == pytest.approx(expected, abs=0.02)
  assert bool(d.routed[..., 0].all())  # the first choice is never subject to the policy
  always = tokens_choose(probs, mask, k=2, capacity=256, second_expert_policy="random")  # no rng: eval
  assert bool(always.routed.all())


def test_expert_dropout_only_inside_experts_and_only_in_training():
  x, mask = random_inputs(6, batch=2, length=8, pad_fraction=0.0)
  config = layer_config(group_size=16, train_capacity_factor=0.0, eval_capacity_factor=0.0,
                        expert_dropout_rate=0.5)
  params = init_layer(config, x)
  rngs = {"dropout": jax.random.PRNGKey(3)}
  eval_y, _, _ = run_layer(config, params, x, mask)
  train_y, _, inter = run_layer(config, params, x, mask, train=True, rngs=rngs)
  assert not np.allclose(eval_y, train_y)                       # active in training ...
  no_dropout = layer_config(group_size=16, train_capacity_factor=0.0, eval_capacity_factor=0.0,
                            expert_dropout_rate=0.0)
  np.testing.assert_allclose(run_layer(no_dropout, params, x, mask, train=True, rngs=rngs)[0], eval_y,
                             atol=1e-6)                         # ... and only through the experts
  eval_again, _, _ = run_layer(config, params, x, mask)
  np.testing.assert_array_equal(eval_y, eval_again)              # never in eval


# --- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,field", [
    (lambda: MoeConfig(num_experts=1, top_k=2), "num_experts"),
    (lambda: MoeConfig(router="switchy"), "router"),
    (lambda: MoeConfig(expert_capacity=0), "expert_capacity"),
    (lambda: MoeConfig(dispatch="sorted"), "dispatch"),
    (lambda: MoeConfig(expert_dtype="float16"), "expert_dtype"),
    (lambda: MoeConfig(num_experts=6, num_group_partitions=0), "num_group_partitions"),
    (lambda: ModelConfig(decoder_sparse="every:2", moe=MoeConfig(router="experts_choose")), "router"),
    (lambda: ModelConfig(decoder_sparse="all", moe=MoeConfig(batch_prioritized=True)), "batch_prioritized"),
])
def test_bad_moe_config_names_the_field(make, field):
  with pytest.raises(ValueError, match=field):
    make()


def test_experts_choose_in_the_encoder_is_fine():
  ModelConfig(encoder_sparse="every:2", moe=MoeConfig(router="experts_choose"))


# --- the router learns through the gate: its gradient against finite differences of the float64 oracle ---------
def _oracle_router_objective(x, mask, p64, weights, *, num_groups, k, cf, activation, balance_coef, z_coef):
  """sum(y * weights) + balance_coef * load balance + z_coef * router z, all in float64 numpy, written from the
  paper's formulas (not from switchx): the objective whose router gradient the layer's autodiff must give."""
  y, _ = oracle_moe(x, mask, p64, activation=activation, num_groups=num_groups, k=k, cf=cf, min_capacity=1)
  num_experts, size = p64["router"].shape[1], len(x) // num_groups
  balance, groups_with_tokens, z = 0.0, 0, []
  for g in range(num_groups):
    real = mask[g * size:(g + 1) * size]
    logits = x[g * size:(g + 1) * size][real] @ p64["router"]                 # [S_real, E]
    if not len(logits):
      continue
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, -1, kind="stable")[:, :k]
    f = np.bincount(top.reshape(-1), minlength=num_experts) / len(logits)    # fraction choosing e (all k ranks)
    balance += num_experts * np.sum(f * probs.mean(0))
    groups_with_tokens += 1
    z.extend(np.log(np.exp(logits).sum(-1)) ** 2)
  return np.sum(y * weights) + balance_coef * balance / groups_with_tokens + z_coef * np.mean(z)


@pytest.mark.parametrize("dispatch,k,cf", [("einsum", 1, 1.25), ("index", 1, 1.25), ("index", 2, 1.0),
                                           ("dropless", 1, 0.0)])
def test_router_gradient_through_the_gate_equals_finite_differences_of_the_oracle(dispatch, k, cf):
  """The released recipe's router objective (expert outputs weighted by their gates, balance loss 1e-2, router
  z-loss 1e-3): the gradient autodiff gives the float32 router kernel equals central finite differences of
  the float64 numpy oracle, entry by entry. Routing decisions are piecewise constant, so the differences see
  only the paths through the gates and the router probabilities: exactly what the router learns from. A
  stop_gradient on the gates, a gate that is not the router probability, or a loss on the wrong logits fails."""
  balance_coef, z_coef, num_groups = 1e-2, 1e-3, 2
  config = layer_config("relu", num_experts=4, top_k=k, group_size=12, dispatch=dispatch,
                        train_capacity_factor=cf, eval_capacity_factor=cf)
  x, mask = random_inputs(11, batch=2, length=12)
  params = init_layer(config, x, seed=3)
  params["router"] = params["router"] * 20.0        # confident, well-separated routing: no near-ties
  weights = np.random.RandomState(5).normal(size=(24, D_MODEL))

  def objective(router):
    y, aux, _ = run_layer(config, {**params, "router": router}, x, mask)
    return (jnp.sum(y.reshape(-1, D_MODEL) * weights) + balance_coef * aux["load_balance_loss"]
            + z_coef * aux["router_z_loss"])

  grad = np.asarray(jax.grad(objective)(params["router"]), np.float64)       # [D, E]
  p64 = {"router": np.asarray(params["router"], np.float64),
         **{n: np.asarray(w, np.float64) for n, w in params["experts"].items()}}
  x64, mask64 = np.asarray(x, np.float64).reshape(-1, D_MODEL), np.asarray(mask).reshape(-1)
  reference = functools.partial(_oracle_router_objective, x64, mask64, weights=weights, num_groups=num_groups,
                                k=k, cf=cf, activation="relu", balance_coef=balance_coef, z_coef=z_coef)
  eps, expected = 1e-6, np.zeros_like(grad)
  for i, j in np.ndindex(*grad.shape):
    plus, minus = dict(p64, router=p64["router"].copy()), dict(p64, router=p64["router"].copy())
    plus["router"][i, j] += eps
    minus["router"][i, j] -= eps
    expected[i, j] = (reference(plus) - reference(minus)) / (2 * eps)
  assert np.abs(expected).max() > 1e-2                   # the gates carry a real signal to the router
  np.testing.assert_allclose(grad, expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max())


# --- the shared expert (Qwen-MoE) ------------------------------------------------------------------------------
def test_shared_expert_adds_its_gated_dense_ffn_to_the_routed_output():
  """With the routed experts' output weights zeroed, the layer's output is exactly sigmoid(x . g) * FFN(x),
  computed here from the parameters by hand; without the gate, FFN(x)."""
  x, mask = random_inputs(3, batch=2, length=6)
  for gate in (True, False):
    config = layer_config(activation="relu", shared_expert_d_ff=12, shared_expert_gate=gate, dispatch="index")
    params = init_layer(config, x, seed=2)
    params = {**params, "experts": {**params["experts"], "wo": jnp.zeros_like(params["experts"]["wo"])}}
    y, _, _ = run_layer(config, params, x, mask)
    shared = params["shared_expert"]
    expected = jax.nn.relu(x @ shared["wi"]["kernel"]) @ shared["wo"]["kernel"]          # [B, L, D]
    if gate:
      expected = jax.nn.sigmoid(x @ params["shared_expert_gate"]["kernel"]) * expected
    else:
      assert "shared_expert_gate" not in params
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_every_dispatch_path_gives_the_same_answer_with_a_shared_expert(top_k):
  x, mask = random_inputs(4, batch=2, length=8)
  results = []
  for dispatch in ("einsum", "index", "dropless", "ragged"):
    config = layer_config(shared_expert_d_ff=8, top_k=top_k, normalize_gates=True, eval_capacity_factor=0.0,
                          group_size=16, dispatch=dispatch)
    params = init_layer(config, x, seed=1)
    loss = lambda params, x: jnp.sum(jnp.sin(run_layer(config, params, x, mask)[0]))
    results.append(jax.value_and_grad(loss, argnums=(0, 1))(params, x))
  (v0, g0), *others = results
  for value, grads in others:
    np.testing.assert_allclose(value, v0, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_shared_expert_counts_as_active_parameters_and_flops():
  from switchx import model_stats
  base = ModelConfig(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=2,
                     num_decoder_layers=2, activation="relu", encoder_sparse="all", decoder_sparse="all",
                     moe=MoeConfig(num_experts=4))
  shared = base.replace(moe=MoeConfig(num_experts=4, shared_expert_d_ff=24))
  plain, more = model_stats.param_counts(base), model_stats.param_counts(shared)
  added = 4 * (2 * 16 * 24 + 16)                              # per sparse layer: wi, wo and the gate [D, 1]
  assert more["total_params"] - plain["total_params"] == added
  assert more["active_params"] - plain["active_params"] == added and more["expert_params"] == plain["expert_params"]
  flops = model_stats.flops_per_token(shared, 16, 16) - model_stats.flops_per_token(base, 16, 16)
  assert flops == pytest.approx(2 * (2 * 2 * 16 * 24 + 2 * 16), rel=1e-9)   # 2 sparse layers per token
  assert ("encoder shared experts", 2 * (2 * 16 * 24 + 16)) in model_stats.module_table(shared)


# --- the balance loss's scope ----------------------------------------------------------------------------------
def test_balance_loss_scope_counts_where_it_says():
  """Two groups of 4 tokens, 2 experts; group 0's tokens all choose expert 0, group 1's expert 1; the router
  probabilities are given. Per group each group is wholly imbalanced; over the global batch the choices balance."""
  probs = jnp.asarray([[[0.9, 0.1]] * 4, [[0.2, 0.8]] * 4], jnp.float32)        # [G=2, S=4, E=2]
  mask = jnp.ones((2, 4), bool)
  decision = tokens_choose(probs, mask, k=1, capacity=4)
  stats = lambda scope, length=0: float(router_stats(jnp.log(probs), probs, mask, decision, 2, scope,
                                                     length)["load_balance_loss"])
  per_group = [2 * (1.0 * 0.9), 2 * (1.0 * 0.8)]                                # E * f_e * P_e, one expert each
  assert stats("group") == pytest.approx(np.mean(per_group))
  assert stats("global") == pytest.approx(2 * (0.5 * 0.55 + 0.5 * 0.45))        # f = (0.5, 0.5), P = (0.55, 0.45)
  assert stats("sequence", 4) == pytest.approx(stats("group"))                   # sequences = the groups here
  assert stats("sequence", 2) == pytest.approx(stats("group"))                   # halves are as imbalanced
  assert stats("sequence", 8) == pytest.approx(stats("global"))                  # one sequence: the whole batch
  usage = router_stats(jnp.log(probs), probs, mask, decision, 2)
  assert float(usage["load_cv"]) == pytest.approx(0.0) and float(usage["max_mean_load"]) == pytest.approx(1.0)
  skewed = tokens_choose(jnp.asarray([[[0.9, 0.1]] * 4] * 2, jnp.float32), mask, k=1, capacity=4)
  usage = router_stats(jnp.log(probs), probs, mask, skewed, 2)                   # every token on expert 0
  assert float(usage["load_cv"]) == pytest.approx(1.0) and float(usage["max_mean_load"]) == pytest.approx(2.0)

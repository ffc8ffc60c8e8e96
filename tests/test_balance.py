"""Load balancing beyond the Switch loss: auxiliary-loss-free bias balancing (Wang et al. 2024, arXiv 2408.15664;
DeepSeek-V3) and DeepSeek's routed scaling factor. (The balance loss's scopes: tests/test_moe.py and the
multidevice tests; exact resume of the bias: tests/test_trainer.py.)"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from helpers.tiny_run import configs
from switchx.config import ModelConfig, MoeConfig, TrainConfig
from switchx.models.encoder_decoder import EncoderDecoder
from switchx.moe import routing
from switchx.moe.layer import MoeLayer
from switchx.moe.routing import tokens_choose
from switchx.train import optim, step as step_lib

D_MODEL, EXPERTS = 16, 8


def layer_config(**moe) -> ModelConfig:
  moe = dict(dict(num_experts=EXPERTS, load_balance_loss_coef=0.0, min_capacity=1), **moe)
  return ModelConfig(vocab_size=8, d_model=D_MODEL, num_heads=1, head_dim=4, d_ff=32, num_encoder_layers=1,
                     num_decoder_layers=0, encoder_sparse="all", moe=MoeConfig(**moe))


def test_the_bias_chooses_the_experts_and_never_weights_them():
  """Hand-worked: two tokens, three experts. The bias is added to the log-probabilities (the logits up to a
  per-token constant) to choose; it makes expert 1 win for token 0 while token 1 keeps expert 0. Each
  gate is the token's router probability of the expert chosen, not anything biased."""
  probs = jnp.asarray([[[0.5, 0.3, 0.2], [0.6, 0.25, 0.15]]], jnp.float32)      # [G=1, S=2, E=3]
  bias = jnp.log(jnp.asarray([1.0, 2.0, 2.2], jnp.float32))   # scores x (1, 2, 2.2): .5 .6 .44 / .6 .5 .33
  decision = tokens_choose(probs, jnp.ones((1, 2), bool), k=1, capacity=2, selection_bias=bias)
  np.testing.assert_array_equal(decision.expert_index[0, :, 0], [1, 0])
  np.testing.assert_allclose(decision.gate[0, :, 0], [0.3, 0.6])
  top2 = tokens_choose(probs, jnp.ones((1, 2), bool), k=2, capacity=2, selection_bias=bias)
  np.testing.assert_array_equal(top2.expert_index[0], [[1, 0], [0, 1]])
  np.testing.assert_allclose(top2.gate[0], [[0.3, 0.5], [0.6, 0.25]])
  # The rule: up by the rate below the mean load, down above it, unchanged at it.
  np.testing.assert_allclose(routing.balance_bias(jnp.zeros(3), jnp.asarray([4.0, 1.0, 1.0]), 0.1), [-0.1, 0.1, 0.1])
  np.testing.assert_allclose(routing.balance_bias(jnp.ones(2), jnp.asarray([3.0, 3.0]), 0.1), [1.0, 1.0])


def _collapsed_layer(rate: float):
  """A layer whose router sends nearly every token to expert 0: every input shares an offset m, and the
  router's column 0 reads 5 / |m| along it (logit ~5 against the others' ~N(0, 1))."""
  config = layer_config(bias_balance_rate=rate)
  offset = jnp.ones(D_MODEL, jnp.float32)                                        # [D], |m| = 4
  layer = MoeLayer.for_model(config)
  x0 = jnp.zeros((4, 64, D_MODEL)) + offset
  params = nn.unbox(layer.init(jax.random.PRNGKey(0), x0, jnp.ones((4, 64), bool), False)["params"])
  # Token-dependent preferences among the experts (logit spread ~1), and expert 0 ahead of them all by ~5.
  kernel = 0.2 * jax.random.normal(jax.random.PRNGKey(1), params["router"].shape)
  params["router"] = kernel.at[:, 0].add(5.0 * offset / jnp.sum(offset ** 2))

  @jax.jit
  def step(params, seed):
    """One training forward on fresh inputs, then the bias rule: the router kernel and experts never change."""
    x = jax.random.normal(jax.random.PRNGKey(seed), (4, 64, D_MODEL)) + offset   # [B, L, D]
    (_, aux), state = layer.apply({"params": params}, x, jnp.ones((4, 64), bool), True, mutable=["balance"])
    if rate > 0:
      load = state["balance"]["router_bias"][0]                                  # [E]
      params = dict(params, router_bias=routing.balance_bias(params["router_bias"], load, rate))
    return params, aux["load_cv"], aux["router_bias"] if rate > 0 else jnp.zeros(EXPERTS)

  return params, step


@pytest.mark.parametrize("rate", [0.05, 0.0])
def test_bias_balancing_alone_brings_a_collapsed_router_to_even_load(rate):
  """From a collapsed start (load CV 2.6: one expert of eight takes nearly every token), with no auxiliary loss
  and no gradient step at all, the bias rule alone brings the load's coefficient of variation under 0.25 within
  100 steps (expert 0's bias must fall ~5 below the others' at up to 2 x 0.05 a step) and keeps it there: the
  mean over the last 100 steps under 0.25 (256 tokens a step: sampling alone gives ~0.18). rate 0 is the
  control: nothing else in the loop balances anything."""
  params, step = _collapsed_layer(rate)
  cvs = []
  for i in range(200):
    params, cv, bias = step(params, i)
    cvs.append(float(cv))
  assert cvs[0] > 2.5, cvs[0]
  if rate == 0:
    assert min(cvs) > 2.5
    return
  first_balanced = next((i for i, cv in enumerate(cvs) if cv < 0.25), None)
  assert first_balanced is not None and first_balanced < 100, cvs[::10]
  assert np.mean(cvs[-100:]) < 0.25 and max(cvs[-100:]) < 0.5, cvs[-100:]
  assert float(bias[0]) < min(float(b) for b in bias[1:]) - 3.0   # the crowded expert pushed far down


def _tiny_model(rate: float):
  model, _, _ = configs(moe_changes=dict(bias_balance_rate=rate))
  model = model.replace(dropout_rate=0.0)   # the forward that reads the load must route as the step did
  rng = np.random.RandomState(0)
  targets = rng.randint(3, model.vocab_size, (4, 8)).astype(np.int32)
  batch = {"encoder_input_tokens": rng.randint(3, model.vocab_size, (4, 32)).astype(np.int32),
           "decoder_target_tokens": targets,
           "decoder_input_tokens": np.concatenate([np.zeros((4, 1), np.int32), targets[:, :-1]], 1)}
  return EncoderDecoder(model), {k: jnp.asarray(v) for k, v in batch.items()}


def _biases(params) -> dict:
  return {"/".join(k[:-1]): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()
          if k[-1] == "router_bias"}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_train_step_sets_each_bias_by_the_rule_from_the_whole_batch_and_the_optimizer_never_moves_it(accumulation):
  """AdamW with weight decay 0.1 would shrink a nonzero bias; after one step each layer's bias is exactly its
  old value + rate * sign(mean load - load), the load counted by a plain forward over the whole batch (with two
  micro-batches too: their loads add up). Every other parameter moves by the optimizer."""
  rate = 0.01
  model, batch = _tiny_model(rate)
  train_cfg = TrainConfig(optimizer="adamw", learning_rate=0.01, weight_decay=0.1, schedule="constant",
                          warmup_steps=0, batch_size=4, gradient_accumulation_steps=accumulation)
  optimizer, schedule = optim.make_optimizer(train_cfg)
  state = step_lib.init_train_state(model, optimizer, jax.random.PRNGKey(0), batch)
  start = {name: np.linspace(-0.05, 0.05, b.size).astype(np.float32) for name, b in _biases(state.params).items()}
  assert len(start) == 2                                                        # encoder and decoder layer 1
  flat = traverse_util.flatten_dict(state.params)
  for path in flat:
    if path[-1] == "router_bias":
      flat[path] = jnp.asarray(start["/".join(path[:-1])])
  state = state.replace(params=traverse_util.unflatten_dict(flat), opt_state=optimizer.init(
      traverse_util.unflatten_dict(flat)))

  _, loads = model.apply({"params": state.params}, **step_lib.model_inputs(batch), train=True,
                         rngs={n: jax.random.PRNGKey(1) for n in step_lib.RNG_STREAMS}, mutable=["balance"])
  expected = {"/".join(k[:-1]): start["/".join(k[:-1])] + rate * np.sign(np.mean(v[0]) - np.asarray(v[0]))
              for k, v in traverse_util.flatten_dict(loads["balance"]).items()}
  assert all(np.any(e != start[k]) for k, e in expected.items())

  train_step = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer, schedule=schedule,
                                         accumulation_steps=accumulation))
  new_state, metrics = train_step(state, batch, jax.random.PRNGKey(1))
  got = _biases(new_state.params)
  assert got.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name].astype(np.float32))
  assert step_lib.EXPERT_LOAD not in metrics
  assert "router/encoder/layers_1/router_bias" in metrics
  moved = traverse_util.flatten_dict(new_state.params)
  router = next(k for k in moved if k[-1] == "router")
  assert np.any(np.asarray(moved[router]) != np.asarray(flat[router]))          # the optimizer still trains it


def test_routed_scaling_factor_multiplies_the_routed_output_on_every_dispatch_path():
  """DeepSeek's routed_scaling_factor: with nothing dropped the routed output is exactly factor x Switch's,
  on the einsum, index and dropless paths, and the three agree."""
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, D_MODEL))
  mask = jnp.ones((2, 8), bool)
  outputs = {}
  for dispatch in ("einsum", "index", "dropless"):
    for factor in (1.0, 8.0):
      config = layer_config(dispatch=dispatch, routed_scaling_factor=factor, train_capacity_factor=0.0,
                            eval_capacity_factor=0.0)
      layer = MoeLayer.for_model(config)
      params = layer.init(jax.random.PRNGKey(0), x, mask, False)
      outputs[dispatch, factor] = np.asarray(layer.apply(params, x, mask, False)[0])
  for dispatch in ("einsum", "index", "dropless"):
    np.testing.assert_allclose(outputs[dispatch, 8.0], 8.0 * outputs[dispatch, 1.0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs[dispatch, 8.0], outputs["einsum", 8.0], rtol=1e-5, atol=1e-6)
  assert np.abs(outputs["einsum", 1.0]).max() > 1e-3


@pytest.mark.parametrize("changes,field", [
    (dict(bias_balance_rate=-0.1), "bias_balance_rate"),
    (dict(bias_balance_rate=0.01, router="experts_choose"), "bias_balance_rate"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
])
def test_bad_balancing_config_names_the_field(changes, field):
  with pytest.raises(ValueError, match=field):
    MoeConfig(**changes)


def test_no_bias_parameter_without_bias_balancing():
  model, batch = _tiny_model(0.0)
  params = step_lib.init_params(model, jax.random.PRNGKey(0), batch)
  assert _biases(params) == {}


def test_idle_and_dead_experts_are_counted():
  """A batch where 2 of 8 experts get no token: idle_experts 2 in the step's metrics; held-out evaluation counts
  the experts none of its tokens chose over all its batches (dead_experts)."""
  from switchx.moe.layer import router_stats
  from switchx.train.metrics import held_out_metrics
  probs = jax.nn.one_hot(jnp.asarray([[0, 1, 2, 3, 4, 5, 0, 1]]), EXPERTS) * 0.9 + 0.1 / EXPERTS   # [1, 8, 8]
  mask = jnp.ones((1, 8), bool)
  stats = router_stats(jnp.log(probs), probs, mask, tokens_choose(probs, mask, k=1, capacity=8), EXPERTS)
  assert float(stats["idle_experts"]) == 2.0

  class FakeRun:   # two held-out batches: expert 7 idle in the first, expert 6 in the second, expert 5 in both
    def __init__(self):
      self.usages = iter([[0.2, 0.2, 0.2, 0.2, 0.1, 0.0, 0.1, 0.0], [0.3, 0.1, 0.2, 0.2, 0.1, 0.0, 0.0, 0.1]])
    shard_batch = staticmethod(lambda batch: batch)
    def eval_step(self, params, batch):
      return {"cross_entropy_loss": 1.0, "accuracy": 0.5, "num_target_tokens": 10.0, "router/dropped_fraction": 0.0,
              "router/encoder/layers_1/expert_usage": np.asarray(next(self.usages))}
  result = held_out_metrics(FakeRun(), None, [{}, {}])
  assert result["router"]["encoder/layers_1"]["dead_experts"] == 1

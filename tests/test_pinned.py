"""Pinned numbers: a fixed-seed tiny Switch model's initial parameters, eval logits, and one training step's loss
and gradients, for each dispatch path and router, must equal the values recorded in tests/golden/pinned_moe.json.

This guards refactors of the MoE path (moving code between files must not change a single number) and catches
silent changes of initialisation, routing priority or rng use. Regenerate only for an intended change:
SWITCHX_REGEN_PINS=1 pytest tests/test_pinned.py, and say why in the commit.

Tolerance: float32 results recomputed on another CPU (CI) may differ in summation order (XLA's CPU backend picks
vector widths and dot kernels by CPU features), ~1e-7 relative per op; rtol 2e-5 leaves room for that over a
few layers and still fails on any real change (a different capacity, gate, init or rng moves logits by >1e-3).
"""

import dataclasses
import functools
import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tiny_switch_config
from switchx.config import TrainConfig
from switchx.models.encoder_decoder import EncoderDecoder
from switchx.train import optim, step as step_lib

GOLDEN = Path(__file__).parent / "golden" / "pinned_moe.json"
RTOL, ATOL = 2e-5, 1e-6

CASES = {
    "einsum_top1": dict(dispatch="einsum"),
    "index_top1": dict(dispatch="index"),
    "dropless_top1": dict(dispatch="dropless"),
    "einsum_top2_random": dict(dispatch="einsum", top_k=2, second_expert_policy="random", normalize_gates=True),
    "index_top2": dict(dispatch="index", top_k=2),
    "einsum_jitter_zloss": dict(dispatch="einsum", jitter_noise=0.1, router_z_loss_coef=1e-3),
}
ENCODER_ONLY = {   # routers that look ahead in the sequence: the decoder stays dense
    "index_batch_prioritized": dict(dispatch="index", batch_prioritized=True),
    "experts_choose": dict(router="experts_choose", dispatch="einsum"),
}
CASES.update(ENCODER_ONLY)


def _config(case):
  changes = dict(CASES[case], train_capacity_factor=1.0, eval_capacity_factor=1.0)
  if case in ENCODER_ONLY:
    moe = dataclasses.replace(tiny_switch_config().moe, **changes)
    return tiny_config(encoder_sparse="every:2", decoder_sparse="none", moe=moe, dropout_rate=0.1)
  return tiny_switch_config(**changes).replace(dropout_rate=0.1)


def _batch():
  rng = np.random.RandomState(7)
  tokens = rng.randint(3, 64, (4, 16)).astype(np.int32)
  targets = rng.randint(3, 64, (4, 8)).astype(np.int32)
  targets[1, 6:] = 0                                                       # some padding
  tokens[2, 12:] = 0
  return {"encoder_input_tokens": tokens, "decoder_target_tokens": targets,
          "decoder_input_tokens": np.concatenate([np.zeros((4, 1), np.int32), targets[:, :-1]], 1),
          "decoder_loss_weights": (targets > 0).astype(np.float32)}


def _projections(tree, seed=0) -> dict:
  """Four fixed random projections of every leaf: a small fingerprint that moves with any element."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf, np.float64).reshape(-1)
    rng = np.random.RandomState(seed + leaf.size)
    out[jax.tree_util.keystr(path)] = (rng.standard_normal((4, leaf.size)) @ leaf).tolist()
  return out


def _measure(case) -> dict:
  config = _config(case)
  model, batch = EncoderDecoder(config), _batch()
  train_cfg = TrainConfig(optimizer="adafactor", learning_rate=1e-2, schedule="constant", warmup_steps=0)
  optimizer, schedule = optim.make_optimizer(train_cfg)
  state = jax.jit(functools.partial(step_lib.init_train_state, model, optimizer))(jax.random.PRNGKey(3), batch)
  logits, _ = jax.jit(model.apply, static_argnames=("train",))(
      {"params": state.params}, **step_lib.model_inputs(batch), train=False)
  loss_fn = functools.partial(step_lib.loss_and_metrics, model=model, z_loss_coef=1e-4, train=True)
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, batch, jax.random.PRNGKey(5))
  return {"params": _projections(nn.unbox(state.params)), "logits": _projections({"logits": logits})["['logits']"],
          "loss": float(loss), "grads": _projections(grads)}


def _close(actual, expected, what):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_and_gradients_are_pinned(case):
  measured = _measure(case)
  golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
  if os.environ.get("SWITCHX_REGEN_PINS"):
    golden[case] = measured
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=0, sort_keys=True))
    pytest.skip("pins regenerated")
  assert case in golden, f"no pinned values for {case}: run with SWITCHX_REGEN_PINS=1"
  expected = golden[case]
  assert sorted(measured["params"]) == sorted(expected["params"]), "the parameter tree changed"
  for name in expected["params"]:
    _close(measured["params"][name], expected["params"][name], f"{case}: initial {name}")
  _close(measured["logits"], expected["logits"], f"{case}: eval logits")
  _close(measured["loss"], expected["loss"], f"{case}: training loss")
  for name in expected["grads"]:
    _close(measured["grads"][name], expected["grads"][name], f"{case}: gradient of {name}")

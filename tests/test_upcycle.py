"""Sparse upcycling: a dense model's FFN copied into every expert with a fresh router gives the dense model's
logits where each token reaches one expert with gate 1; Drop-Upcycling re-initialises exactly its share of each
expert; bad configs fail before anything is built; `switchx upcycle` trains through the normal trainer."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from conftest import init_params, jitted_apply, tiny_config  # noqa: E402
from run_dirs import command_flags, task_tokenizer, tiny_model, write_run_dir  # noqa: E402
from switchx import cli  # noqa: E402
from switchx.config import MoeConfig, TrainConfig  # noqa: E402
from switchx.train.upcycle import upcycle_params  # noqa: E402


def _sparse(dense, **moe):
  moe = MoeConfig(**{"num_experts": 4, "group_size": 64, "min_capacity": 1, **moe})
  return dense.replace(encoder_sparse="every:2", decoder_sparse="every:2", moe=moe)


def _logits(config, params):
  rng = np.random.RandomState(0)
  enc = jnp.asarray(rng.randint(1, 64, (3, 16)), jnp.int32)
  dec = jnp.asarray(np.concatenate([np.zeros((3, 1)), rng.randint(1, 64, (3, 7))], 1), jnp.int32)
  return np.asarray(jitted_apply(config)({"params": params}, enc, dec, train=False)[0])


NLLB_SHAPED = dict(activation="relu", position_embedding="sinusoidal", norm="layer", use_bias=True,
                   scale_embeddings=True, logits_via_embedding=True, rescale_tied_logits=False)


@pytest.mark.parametrize("dispatch,variant", [("einsum", "t5"), ("index", "t5"), ("dropless", "t5"),
                                              ("index", "nllb")])
def test_upcycled_model_gives_the_dense_logits_when_each_token_gets_one_expert_with_gate_1(dispatch, variant):
  """(nllb: biases everywhere, so each expert also starts with the dense FFN's biases.)"""
  dense = tiny_config(activation="gated-gelu") if variant == "t5" else tiny_config(**NLLB_SHAPED)
  dense_params = init_params(dense)
  if variant == "nllb":   # zero-initialised biases would not show whether they were carried: make them random
    dense_params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.3 * np.random.RandomState(len(jax.tree_util.keystr(path))).normal(size=v.shape)
        if "bias" in jax.tree_util.keystr(path) else v, dense_params)
  # top-1 with normalised gates: each token's gate is exactly 1; eval capacity factor 0: no token dropped.
  sparse = _sparse(dense, normalize_gates=True, eval_capacity_factor=0.0, dispatch=dispatch)
  params = upcycle_params(dense, dense_params, sparse, jax.random.PRNGKey(1))
  # Bit-identical on the development machine (Xeon, XLA CPU); 1e-6 leaves room for another CPU's dot kernels
  # summing the expert-major products in another order than the dense FFN's.
  np.testing.assert_allclose(_logits(sparse, params), _logits(dense, dense_params), rtol=1e-6, atol=1e-6)
  # Switch's raw gate (the router probability, ~1/E from a fresh router) scales every expert output down: the
  # same parameters then give other logits, so the comparison above can fail.
  raw = _sparse(dense, eval_capacity_factor=0.0, dispatch=dispatch)
  assert np.abs(_logits(raw, params) - _logits(dense, dense_params)).max() > 1e-2


def test_every_expert_starts_as_the_dense_ffn_and_the_rest_is_copied():
  dense = tiny_config()
  dense_params = init_params(dense)
  sparse = _sparse(dense)
  params = upcycle_params(dense, dense_params, sparse, jax.random.PRNGKey(1), router_stddev=0.1)
  moe = params["encoder"]["layers_1"]["moe"]
  assert set(moe["experts"]) == {"wi_0", "wi_1", "wo"} and "mlp" not in params["encoder"]["layers_1"]
  for name, w in moe["experts"].items():
    assert w.shape[0] == 4 and all(np.array_equal(w[e], dense_params["encoder"]["layers_1"]["mlp"][name]["kernel"])
                                   for e in range(4))
  assert moe["router"].shape == (32, 4) and 0.05 < moe["router"].std() < 0.2      # fresh, at the given scale
  assert np.array_equal(params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"],
                        dense_params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])  # dense layers stay dense
  assert np.array_equal(params["token_embedder"]["embedding"], dense_params["token_embedder"]["embedding"])
  shapes = jax.tree_util.tree_map(np.shape, init_params(sparse))
  assert jax.tree_util.tree_map(np.shape, params) == shapes                      # the sparse model's tree


def test_drop_upcycling_reinitialises_its_share_of_each_experts_hidden_units():
  dense = tiny_config(activation="relu")
  dense_params = init_params(dense)
  params = upcycle_params(dense, dense_params, _sparse(dense), jax.random.PRNGKey(1), reinit_fraction=0.25)
  experts = params["decoder"]["layers_1"]["moe"]["experts"]
  wi, wo = dense_params["decoder"]["layers_1"]["mlp"]["wi"]["kernel"], dense_params["decoder"]["layers_1"]["mlp"][
      "wo"]["kernel"]
  changed = []
  for e in range(4):
    columns = np.flatnonzero((experts["wi"][e] != wi).any(0))                     # hidden units of wi
    rows = np.flatnonzero((experts["wo"][e] != wo).any(1))
    assert len(columns) == 16 and np.array_equal(columns, rows)                   # 25% of 64, the same units
    changed.append(set(columns))
  assert len({frozenset(c) for c in changed}) > 1                                 # drawn per expert


@pytest.mark.parametrize("change,message", [
    (dict(encoder_sparse="none", decoder_sparse="none"), "no sparse layer"),
    (dict(d_model=48), "d_model"),
    (dict(moe=MoeConfig(num_experts=4, expert_d_ff=32)), "expert_d_ff"),
])
def test_bad_upcycling_configs_name_the_problem(change, message):
  dense = tiny_config()
  sparse = dataclasses.replace(_sparse(dense), **change)
  with pytest.raises(ValueError, match=message):
    upcycle_params(dense, init_params(dense), sparse, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="already has sparse"):
    upcycle_params(_sparse(dense), init_params(_sparse(dense)), _sparse(dense), jax.random.PRNGKey(0))


def test_command_line_upcycles_a_dense_run_trains_and_resumes(tmp_path, capsys):
  tokenizer = task_tokenizer(tmp_path)
  dense = tiny_model(encoder_sparse="none", decoder_sparse="none")
  train = TrainConfig(batch_size=8, inputs_length=32, targets_length=8)
  run = write_run_dir(tmp_path / "dense", dense, train, tokenizer)
  argv = ["upcycle", "--init_from", str(run), "--model_dir", str(tmp_path / "up"), "--gin_file", "runs/demo",
          *command_flags(tiny_model(), tokenizer)]                         # every FFN sparse, 4 experts
  assert cli.main(argv) == 0
  assert "step 30:" in capsys.readouterr().out
  history = [json.loads(line) for line in (tmp_path / "up" / "metrics.jsonl").read_text().splitlines()]
  losses = [h["cross_entropy_loss"] for h in history if "cross_entropy_loss" in h]
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])
  record = json.loads((tmp_path / "up" / "config.json").read_text())
  assert record["model"]["encoder_sparse"] == "all" and record["model"]["moe"]["num_experts"] == 4
  assert cli.main(argv) == 0 and "already trained" in capsys.readouterr().out   # resumes: nothing left to do


# --- decoder-only (causal LM) models -----------------------------------------------------------------------------
def _lm(**changes):
  from switchx.config import DecoderOnlyConfig
  base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, sparse="none")
  return DecoderOnlyConfig(**{**base, **changes})


def _lm_params(config, seed=0):
  import flax.linen as nn
  from switchx.models.decoder_only import DecoderOnly
  return jax.device_get(nn.unbox(DecoderOnly(config).init(jax.random.PRNGKey(seed), jnp.ones((1, 4), jnp.int32))
                                 ["params"]))


def _lm_logits(config, params):
  from switchx.models.decoder_only import DecoderOnly
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, 64, (3, 12)), jnp.int32)
  return np.asarray(DecoderOnly(config).apply({"params": params}, tokens, train=False)[0])


@pytest.mark.parametrize("dispatch", ["einsum", "index"])
def test_upcycled_causal_lm_gives_the_dense_logits_when_each_token_gets_one_expert_with_gate_1(dispatch):
  dense = _lm()
  dense_params = _lm_params(dense)
  moe = MoeConfig(num_experts=4, group_size=64, min_capacity=1, normalize_gates=True, eval_capacity_factor=0.0,
                  dispatch=dispatch)
  sparse = dense.replace(sparse="every:2", moe=moe)
  params = upcycle_params(dense, dense_params, sparse, jax.random.PRNGKey(1))
  assert "moe" in params["layers_1"] and "mlp" in params["layers_0"]                 # top-level layers, as the model
  assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(np.shape, _lm_params(sparse))
  np.testing.assert_allclose(_lm_logits(sparse, params), _lm_logits(dense, dense_params), rtol=1e-6, atol=1e-6)
  raw = sparse.replace(moe=dataclasses.replace(moe, normalize_gates=False))   # Switch's ~1/E gate: other logits
  assert np.abs(_lm_logits(raw, params) - _lm_logits(dense, dense_params)).max() > 1e-2


def test_upcycling_refuses_a_config_of_another_family_or_shape():
  dense = _lm()
  with pytest.raises(ValueError, match="upcycling keeps the architecture"):
    upcycle_params(dense, _lm_params(dense), _sparse(tiny_config()), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="DecoderOnlyConfig.num_kv_heads"):
    upcycle_params(dense, _lm_params(dense), _lm(sparse="all", num_kv_heads=4), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="no sparse layer.*DecoderOnlyConfig.sparse"):
    upcycle_params(dense, _lm_params(dense), _lm(), jax.random.PRNGKey(0))


def test_command_line_upcycles_a_causal_lm_and_continues_its_data(tmp_path, capsys):
  """`switchx train` a dense mixtral_tiny, then `switchx upcycle --continue_data --carry_optimizer_state`: the
  upcycled run's data picks up where the dense run's stopped (the causal pipeline takes one chunk per row: the
  position moves by batch x steps) and its optimizer counts on from the dense run's steps; a data setting that
  differs fails before anything is built."""
  from switchx.train import restore
  common = ["--gin_file", "mixtral_tiny", "--gin.TrainConfig.num_train_steps=6", "--gin.TrainConfig.eval_every=0",
            "--gin.TrainConfig.batch_size=4", "--gin.TrainConfig.inputs_length=24",
            "--gin.TrainConfig.targets_length=8", "--gin.TrainConfig.eval_batches=1", "--gin.TrainConfig.log_every=1",
            "--gin.DecoderOnlyConfig.num_layers=2", "--gin.MoeConfig.num_experts=4", "--gin.MoeConfig.top_k=1"]
  assert cli.main(["train", "--model_dir", str(tmp_path / "dense"), *common,
                   "--gin.DecoderOnlyConfig.sparse='none'"]) == 0
  dense_position = restore.load_model(tmp_path / "dense").data_state["position"]
  assert dense_position == 6 * 4
  up = ["upcycle", "--init_from", str(tmp_path / "dense"), "--model_dir", str(tmp_path / "up"), *common]
  assert cli.main([*up, "--continue_data", "--carry_optimizer_state"]) == 0
  loaded = restore.load_model(tmp_path / "up", with_optimizer_state=True)
  assert loaded.config.sparse_layers == (0, 1) and loaded.data_state["position"] == dense_position + 6 * 4
  counts = [int(c) for p, c in jax.tree_util.tree_flatten_with_path(jax.device_get(loaded.opt_state))[0]
            if jax.tree_util.keystr(p).endswith(".count") and np.ndim(c) == 0]
  assert counts and set(counts) == {12}         # the dense run's 6 optimizer steps carried, then 6 more
  history = [json.loads(line) for line in (tmp_path / "up" / "metrics.jsonl").read_text().splitlines()]
  assert np.isfinite([h["cross_entropy_loss"] for h in history if "cross_entropy_loss" in h]).all()
  capsys.readouterr()
  assert cli.main([*up[:4], str(tmp_path / "up2"), *common, "--gin.TrainConfig.inputs_length=32",
                   "--continue_data"]) != 0
  assert "pipeline state is from a different corpus or configuration" in capsys.readouterr().err
  assert not (tmp_path / "up2" / "checkpoints").exists()


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_carried_optimizer_state_gives_each_expert_its_dense_ffns_and_fresh_routers(optimizer):
  """--carry_optimizer_state: every expert's optimizer entries (Adafactor's per-expert branch, AdamW's moments) are
  the dense FFN's, counters the dense run's, the router's fresh; a dense run of another optimizer is an error."""
  from switchx.train import optim
  from switchx.train.upcycle import upcycle_optimizer_state
  dense, train = _lm(), TrainConfig(optimizer=optimizer, learning_rate=1e-2, schedule="constant", warmup_steps=0)
  sparse = dense.replace(sparse="every:2", moe=MoeConfig(num_experts=4, group_size=64))
  tx = optim.make_optimizer(train, config=dense)[0]
  dense_params = _lm_params(dense)
  state = tx.init(dense_params)
  for seed in range(3):   # a few updates with random gradients: moments that differ from a fresh state
    grads = jax.tree_util.tree_map(lambda p: np.random.RandomState(seed).normal(size=p.shape).astype(np.float32),
                                   dense_params)
    state = tx.update(grads, state, dense_params)[1]
  sparse_params = upcycle_params(dense, dense_params, sparse, jax.random.PRNGKey(1))
  sparse_tx = optim.make_optimizer(train, config=sparse)[0]
  fresh = jax.device_get(sparse_tx.init(sparse_params))
  carried = upcycle_optimizer_state(jax.device_get(state), fresh, 4)
  dense_leaves = dict((jax.tree_util.keystr(p), np.asarray(v))
                      for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0])
  checked = {"expert": 0, "router": 0, "count": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(carried)[0]:
    key, leaf = jax.tree_util.keystr(path), np.asarray(leaf)
    fresh_leaf = np.asarray(dict((jax.tree_util.keystr(p), v) for p, v in
                                 jax.tree_util.tree_flatten_with_path(fresh)[0])[key])
    if "['experts']['wi_0']" in key and leaf.size > 4:
      named = key.replace("['moe']['experts']['wi_0']", "['mlp']['wi_0']['kernel']")   # the dense FFN's entry,
      source = dense_leaves.get(named, dense_leaves.get(named.replace("['expert']", "['dense']")))  # its branch
      assert all(np.array_equal(leaf[e], source) for e in range(4)) and not np.array_equal(leaf, fresh_leaf)
      checked["expert"] += 1
    elif "['router']" in key:
      np.testing.assert_array_equal(leaf, fresh_leaf)
      checked["router"] += 1
    elif key.endswith(".count") and leaf.ndim == 0:
      assert int(leaf) == 3
      checked["count"] += 1
  assert all(checked.values()), checked
  other = optim.make_optimizer(dataclasses.replace(train, optimizer="adamw" if optimizer == "adafactor"
                                                   else "adafactor"), config=dense)[0]
  with pytest.raises(ValueError, match="another optimizer"):
    upcycle_optimizer_state(jax.device_get(other.init(dense_params)), fresh, 4)

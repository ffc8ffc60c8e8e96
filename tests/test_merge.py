"""Expert merging (switchx/merge.py): identity groups and identical experts keep the logits exactly, merged
experts are usage-weighted averages, the merged model is smaller and runs on every dispatch path."""

import jax
import numpy as np
import pytest

from conftest import init_params, tiny_config
from switchx import api, model_stats
from switchx.config import MoeConfig
from switchx.merge import merge_experts, similar_experts


def _config(**moe):
  moe = MoeConfig(**{**dict(num_experts=4, group_size=64, train_capacity_factor=0.0, eval_capacity_factor=0.0,
                            min_capacity=1), **moe})
  return tiny_config(encoder_sparse="every:2", decoder_sparse="every:2", moe=moe)


def _tokens(seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, 64, (3, 10)).astype(np.int32)
  dec = np.concatenate([np.zeros((3, 1), np.int32), rng.randint(2, 64, (3, 6))], 1).astype(np.int32)
  return enc, dec


def _logits(config, params, seed=0):
  return np.asarray(api.logits(config, params, *_tokens(seed)))


@pytest.mark.parametrize("top_k", [1, 2])
def test_identity_groups_keep_the_logits(top_k):
  config = _config(top_k=top_k)
  params = init_params(config)
  merged_config, merged = merge_experts(config, params, [[0], [1], [2], [3]])
  assert merged_config.moe.expert_map == (0, 1, 2, 3)
  np.testing.assert_array_equal(_logits(merged_config, merged), _logits(config, params))


@pytest.mark.parametrize("top_k,dispatch", [(1, "einsum"), (2, "index"), (2, "dropless")])
def test_merging_identical_experts_keeps_the_logits(top_k, dispatch):
  """Experts 1 and 3 made copies of expert 0 in every layer: merging {0, 1, 3} into one expert (4 -> 2 experts)
  serves every token with the same function and gate as before (a top-2 token whose two choices were both
  copies gets the merged expert twice, with both gates), so the logits stay; a different usage weighting of
  identical experts changes nothing either."""
  config = _config(top_k=top_k, dispatch=dispatch)
  params = jax.tree_util.tree_map(np.asarray, init_params(config))
  for stack in ("encoder", "decoder"):
    experts = params[stack]["layers_1"]["moe"]["experts"]
    for name, w in experts.items():
      w = np.array(w)
      w[1] = w[3] = w[0]
      experts[name] = w
  merged_config, merged = merge_experts(config, params, [[0, 1, 3], [2]], usage=[0.5, 0.1, 0.3, 0.1])
  assert merged_config.moe.num_experts == 2 and merged_config.moe.expert_map == (0, 0, 1, 0)
  np.testing.assert_allclose(_logits(merged_config, merged), _logits(config, params), atol=2e-5)
  counts = lambda c: model_stats.param_counts(c)["expert_params"]
  assert counts(merged_config) == counts(config) // 2


def test_merged_experts_are_usage_weighted_averages_and_the_model_changes():
  config = _config()
  params = init_params(config)
  usage = np.asarray([0.1, 0.3, 0.2, 0.4])
  merged_config, merged = merge_experts(config, params, [[0, 1], [2, 3]], usage=usage)
  w = np.asarray(params["encoder"]["layers_1"]["moe"]["experts"]["wo"])
  got = np.asarray(merged["encoder"]["layers_1"]["moe"]["experts"]["wo"])
  np.testing.assert_allclose(got[0], 0.25 * w[0] + 0.75 * w[1], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got[1], (0.2 * w[2] + 0.4 * w[3]) / 0.6, rtol=1e-6, atol=1e-7)
  assert np.abs(_logits(merged_config, merged) - _logits(config, params)).max() > 1e-4
  again_config, again = merge_experts(merged_config, merged, [[0, 1]])         # merging a merged model composes
  assert again_config.moe.expert_map == (0, 0, 0, 0) and np.isfinite(_logits(again_config, again)).all()


def test_similar_experts_groups_the_copies_together():
  config = _config(num_experts=6)
  params = jax.tree_util.tree_map(np.asarray, init_params(config))
  for stack in ("encoder", "decoder"):
    experts = params[stack]["layers_1"]["moe"]["experts"]
    for name, w in experts.items():
      w = np.array(w)
      w[4] = w[1] + 1e-3 * np.random.RandomState(0).normal(size=w[1].shape)
      w[5] = w[2]
      experts[name] = w
  assert similar_experts(params, config, 4) == [[0], [1, 4], [2, 5], [3]]
  with pytest.raises(ValueError, match="num_merged"):
    similar_experts(params, config, 7)


def test_bad_groups_are_refused():
  config = _config()
  params = init_params(config)
  with pytest.raises(ValueError, match="partition"):
    merge_experts(config, params, [[0, 1], [1, 2, 3]])
  with pytest.raises(ValueError, match="expert_map"):
    MoeConfig(num_experts=2, expert_map=(0, 2))


def test_command_line_merges_a_saved_model(tmp_path, capsys):
  from switchx import cli
  config = _config()
  api.save(config, init_params(config), str(tmp_path / "model"))
  assert cli.main(["merge", "--model", str(tmp_path / "model"), "--experts", "2", "--out", str(tmp_path / "m2")]) == 0
  assert "merged 4 experts into 2" in capsys.readouterr().out
  merged_config, merged = api.load(str(tmp_path / "m2"))
  assert merged_config.moe.num_experts == 2 and len(merged_config.moe.expert_map) == 4
  assert np.isfinite(_logits(merged_config, merged)).all()

"""Gin presets: every file parses and builds its abstract model; sizes match the published ones; the docs' table
is what the tool prints; bad names get suggestions."""

import functools
import json
import re
from pathlib import Path

import pytest

from switchx import cli, gin_config, model_stats

PUBLISHED = {  # released checkpoints' total parameters (../shared/reference/SWITCH_FACTS.md)
    "switch_base_8": 0.62e9, "switch_base_16": 1.07e9, "switch_base_32": 2.0e9, "switch_base_64": 3.8e9,
    "switch_base_128": 7.4e9, "switch_base_256": 14.7e9, "switch_large_128": 26e9, "switch_xxl_128": 395e9,
    "switch_c_2048": 1571e9,
}
T5_V1_1 = {"t5_v1_1_small": (512, 64, 1024, 8, 6), "t5_v1_1_base": (768, 64, 2048, 12, 12),
           "t5_v1_1_large": (1024, 64, 2816, 24, 16)}


@functools.lru_cache(maxsize=None)
def _summary(preset: str) -> dict:
  gin_config.parse([preset])
  return model_stats.summary(gin_config.model_config())


@pytest.mark.parametrize("preset", gin_config.presets())
def test_every_gin_file_parses_and_builds_its_model(preset):
  gin_config.parse([preset])
  model, train = gin_config.model_config(), gin_config.train_config()
  counts = _summary(preset)  # jax.eval_shape of the model's init: builds the whole (abstract) model
  assert counts["total_params"] > 0 and counts["active_params"] <= counts["total_params"]
  assert train.batch_size > 0 and model.vocab_size > 0


@pytest.mark.parametrize("preset,published", sorted(PUBLISHED.items()))
def test_published_parameter_counts_within_two_percent(preset, published):
  total = _summary(preset)["total_params"]
  assert abs(total / published - 1) < 0.02, (preset, total)


@pytest.mark.parametrize("preset", sorted(T5_V1_1))
def test_t5_presets_match_transformers(preset):
  torch = pytest.importorskip("torch", reason="needs the interop extra: pip install -e '.[interop]'")
  transformers = pytest.importorskip("transformers", reason="needs the interop extra")
  d_model, d_kv, d_ff, layers, heads = T5_V1_1[preset]
  with torch.device("meta"):
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=32128, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False))
  # transformers 5.x aliases lm_head to `shared`; a v1.1 checkpoint stores both (see tests/test_model.py).
  hf_count = sum(p.numel() for n, p in hf.named_parameters(remove_duplicate=False)
                 if not n.endswith("embed_tokens.weight"))
  assert _summary(preset)["total_params"] == hf_count


def test_switch_experts_add_parameters_not_flops():
  base8, base128 = _summary("switch_base_8"), _summary("switch_base_128")
  assert base128["total_params"] > 10 * base8["total_params"]
  assert base128["flops_per_token"] / base8["flops_per_token"] < 1.01  # only the router grows
  assert _summary("switch_small_8")["flops_per_token"] == pytest.approx(_summary("dense_small")["flops_per_token"],
                                                                          rel=0.01)


def test_docs_table_is_generated_by_the_tool():
  doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
  table = re.search(r"<!-- preset-table:begin -->\n(.*)\n<!-- preset-table:end -->", doc, re.S).group(1)
  assert table == cli.preset_table_markdown(), "docs/configuration.md is stale: paste `switchx params --all`"


def test_cli_params_json(capsys):
  assert cli.main(["params", "--gin_file", "switch_base_8", "--gin.MoeConfig.num_experts=16", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert set(out) == {"total_params", "expert_params", "active_params", "flops_per_token"}
  assert out["total_params"] == _summary("switch_base_16")["total_params"]


@pytest.mark.parametrize("argv,expected", [
    (["params", "--gin_file", "switch_bse_8"], "Did you mean switch_base_8"),
    (["params", "--gin_file", "switch_base_8", "--gin.ModelConfig.d_modle=3"], "Did you mean ModelConfig.d_model"),
    (["params", "--gin_file", "switch_base_8", "--gin.MoeConfg.top_k=2"], "Did you mean MoeConfig.top_k"),
])
def test_bad_names_suggest_the_closest_valid_ones(argv, expected, capsys):
  assert cli.main(argv) == 2
  assert expected in capsys.readouterr().err


def test_bad_binding_inside_a_gin_file_names_the_file(tmp_path):
  bad = tmp_path / "bad.gin"
  bad.write_text("include 'models/switch_base_8.gin'\nMoeConfig.num_expertz = 4\n")
  with pytest.raises(ValueError, match=r"bad.gin.*Did you mean MoeConfig.num_experts"):
    gin_config.parse([str(bad)])


def test_command_line_bindings_override_files():
  model, _ = gin_config.load(["switch_base_8"], ["MoeConfig.num_experts=32", "ModelConfig.dtype='bfloat16'"])
  assert model.moe.num_experts == 32 and model.dtype == "bfloat16" and model.d_model == 768

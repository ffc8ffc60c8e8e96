"""`switchx eval`: held-out metrics of a run's checkpoint with the eval capacity factor, written to eval.json;
a config that does not match the checkpoint is refused before anything compiles."""

import json
import time

import numpy as np
import pytest

from conftest import jitted_apply
from helpers import run_dirs
from switchx import cli
from switchx.config import TrainConfig
from switchx.losses import cross_entropy
from switchx.train import restore
from switchx.train.evaluate import evaluate_run
from switchx.train.loop import load_data

TRAIN = TrainConfig(batch_size=8, inputs_length=32, targets_length=8, eval_batches=2)


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  return run_dirs.write_run_dir(root / "pre", run_dirs.tiny_model(), TRAIN, run_dirs.task_tokenizer(root))


def test_eval_writes_held_out_metrics(pre, capsys):
  assert cli.main(["eval", "--model_dir", str(pre)]) == 0
  out = capsys.readouterr().out
  assert "neg_log_perplexity" in out and "encoder/layers_0" in out
  result = json.loads((pre / "eval.json").read_text())
  assert result["step"] == 1 and result["batches"] == TRAIN.eval_batches
  assert result["eval_capacity_factor"] == 2.0
  assert set(result["router"]) == {"encoder/layers_0", "decoder/layers_0"}
  for metrics in result["router"].values():
    assert 0 <= metrics["dropped_fraction"] <= 1 and len(metrics["expert_usage"]) == 4
    assert sum(metrics["expert_usage"]) == pytest.approx(1.0, abs=1e-5)

  # The same number from the model directly: -(mean cross-entropy per target token) over the held-out batches.
  loaded = restore.load_model(pre)
  data = restore.data_config_from(json.loads((pre / "config.json").read_text())["data"])
  _, _, batches = load_data(data, TRAIN)
  total = tokens = 0.0
  for batch in batches:
    inputs = {k: v for k, v in batch.items() if k != "decoder_loss_weights"}
    logits, _ = jitted_apply(loaded.config)({"params": loaded.params}, **inputs)
    ce, _, _ = cross_entropy(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
    total, tokens = total + float(ce), tokens + float(batch["decoder_loss_weights"].sum())
  assert result["num_target_tokens"] == tokens
  assert result["neg_log_perplexity"] == pytest.approx(-total / tokens, rel=1e-5)
  assert -result["neg_log_perplexity"] > np.log(2)                           # random weights: far from perfect


def test_eval_uses_the_eval_capacity_factor(pre):
  roomy = evaluate_run(pre, write=False)
  tight = evaluate_run(pre, moe_changes={"eval_capacity_factor": 0.25}, write=False)
  assert tight["eval_capacity_factor"] == 0.25
  assert tight["dropped_fraction"] > roomy["dropped_fraction"]
  assert tight["neg_log_perplexity"] != roomy["neg_log_perplexity"]


@pytest.mark.parametrize("flag,expected", [
    ("--gin.ModelConfig.d_model=64", "ModelConfig.d_model=64 does not match"),
    ("--gin.MoeConfig.num_experts=8", "MoeConfig.num_experts=8 does not match"),
])
def test_mismatching_config_is_refused_before_compiling(pre, flag, expected, capsys):
  started = time.perf_counter()
  assert cli.main(["eval", "--model_dir", str(pre), flag]) == 2
  assert expected in capsys.readouterr().err
  assert time.perf_counter() - started < 5


def test_missing_run_is_a_clear_error(tmp_path, capsys):
  assert cli.main(["eval", "--model_dir", str(tmp_path / "nowhere")]) == 2
  assert "config.json" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    restore.load_model(tmp_path / "run")

"""Each reproduction script runs end to end in --quick mode (tiny model, a few steps) and writes its table, JSON and
plot; the experiments README quotes the committed full-run results exactly."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from experiments import (adam_moments, balancing, capacity_factor, distillation, expert_count, extraction,
                         gpu_scaling, init_scale, lm_regime, merging, quantization, regime, report, sparse_vs_dense,
                         upcycling)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  return tmp_path_factory.mktemp("experiments")


@pytest.mark.parametrize("script,name,extra", [
    (expert_count, "expert_count", ["--wide", "2", "--at_steps", "2"]), (capacity_factor, "capacity_factor", []),
    (sparse_vs_dense, "sparse_vs_dense", ["--target_step", "2"]), (init_scale, "init_scale", []),
    (adam_moments, "adam_moments", []), (gpu_scaling, "gpu_scaling", []), (regime, "regime", []),
    (upcycling, "upcycling", []), (distillation, "distillation", []), (balancing, "balancing", []),
    (quantization, "quantization", []), (merging, "merging", []), (extraction, "extraction", []),
    (lm_regime, "lm_regime", [])])
def test_script_quick_mode(script, name, extra, work):
  out = work / "results"
  script.main(["--quick", "--out", str(out), "--work_dir", str(work / "runs"), *extra])
  payload = json.loads((out / f"{name}.json").read_text())
  assert payload["command"] and payload["rows"]
  assert (out / f"{name}.md").read_text().count("|") > 8
  assert (out / f"{name}.png").stat().st_size > 1000
  if name == "expert_count":  # the widened dense control, and a column for the held-out loss at step 2
    wide = [row for row in payload["rows"] if row["wide"] == 2]
    assert len(wide) == 1 and wide[0]["total_params"] > payload["rows"][0]["total_params"]
    assert "at step 2 |" in (out / f"{name}.md").read_text()
    switch = next(row for row in payload["rows"] if row["experts"] == 2)
    assert set(switch["runs"][0]["router_confidence"]) == {"encoder/layers_0", "decoder/layers_0"}
    assert "router confidence, enc / dec |" in (out / f"{name}.md").read_text()
  if name == "sparse_vs_dense":
    assert payload["target_step"] == 2
  if name == "regime":  # dense, its wider control and switch per candidate; one seed: the gate is not read
    row = payload["rows"][0]
    assert list(row["models"]) == ["dense", "dense, d_ff x8", "switch-8"] and row["gate_passed"] is None
    assert row["models"]["dense, d_ff x8"]["params"] > row["models"]["dense"]["params"]
  if name == "lm_regime":  # dense, its 8x-wide control, Switch at the dense model's FLOPs; one seed: no gate
    rows = {row["model"]: row for row in payload["rows"]}
    assert list(rows) == ["dense", "control: d_ff x8", "switch-2"] and payload["gate_passed"] is None
    assert rows["control: d_ff x8"]["total_params"] > rows["dense"]["total_params"]
    assert rows["switch-2"]["flops_per_token"] < 1.02 * rows["dense"]["flops_per_token"]
    assert rows["dense"]["steps_to_dense_loss"][0] is not None
  if name == "upcycling":  # four arms at equal compute; the continued arms carry the dense run's first steps
    assert [row["arm"] for row in payload["rows"]] == ["dense continued", "upcycled", "switch-8 from scratch",
                                                       "dense from scratch"]
    for row in payload["rows"][:2]:
      steps = [s for s, _ in row["runs"][0]["eval_curve"]]
      assert steps[0] <= payload["dense_steps"] < steps[-1] == payload["setting"]["steps"]
  if name == "distillation":  # the kept share is not read where the teacher has no gain to keep
    assert len(payload["kept_gain"]) == len(payload["kept_gain_over_control"]) == len(payload["kept_gain_fresh"]) == 1
    assert [row["model"] for row in payload["rows"]] == ["teacher", "dense", "student", "control", "fresh"]
    assert ("not read" in (out / f"{name}.md").read_text()) == (payload["teacher_gain"] <= 0)
  if name == "balancing":  # the load CV over training, per variant; granularity keeps the FLOPs per token
    rows = {row["variant"]: row for row in payload["rows"]}
    assert payload["dense"]["eval_loss_mean"] and rows["switch loss (group)"]["gain_vs_dense"] is not None
    assert len(rows["bias (no loss)"]["final_bias"][0]) == 1 and not rows["switch loss (group)"]["final_bias"][0]
    assert all(row["load_cv_curves"][0] for row in rows.values())
    fine, coarse = rows["granularity 2"]["flops_per_token"], rows["switch loss (group)"]["flops_per_token"]
    assert coarse < fine < 1.03 * coarse          # the same expert FLOPs; only the router grows (2x the experts)
    assert rows["granularity 2"]["params"] > rows["switch loss (group)"]["params"]   # router columns only
    assert (out / f"{name}_load_cv.png").stat().st_size > 1000
  if name == "quantization":  # float32 first; the file shrinks with the bits; int8 changes the loss by little
    rows = payload["rows"]
    assert list(rows)[0] == "float32" and rows["float32"]["delta"] == 0.0
    assert rows["float32"]["file_mib"] > rows["int8 RTN"]["file_mib"] > rows["int4 RTN"]["file_mib"]
    assert abs(rows["int8 RTN"]["delta"]) < 0.01
  if name == "merging":  # E' = E merges nothing: the same loss; fewer experts, fewer parameters
    rows = {int(k): v for k, v in payload["rows"].items()}
    assert abs(rows[max(rows)]["delta"]) < 1e-6
    assert rows[1]["expert_params"] * max(rows) == rows[max(rows)]["expert_params"]
  if name == "extraction":  # the extracted task model is the task-routed model on the task's inputs
    for row in payload["rows"]:
      assert abs(row["extracted"]["loss"] - row["task-routed"]["loss"]) < 1e-4
      assert row["extracted"]["exact_match"] == row["task-routed"]["exact_match"]
      assert row["extracted"]["expert_params"] < row["task-routed"]["expert_params"]
  if name == "gpu_scaling":  # tokens/s per model; MFU needs a known peak (none for a CPU)
    assert all(row["tokens_per_s"] > 0 for row in payload["rows"]) and payload["peak_flops"] is None
    assert {row["experts"] for row in payload["rows"]} == {0, 8}


def test_readme_quotes_the_committed_results():
  readme = (ROOT / "experiments" / "README.md").read_text()
  for name, table in report.tables(ROOT / "experiments" / "results").items():
    block = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", readme, re.S)
    assert block, f"experiments/README.md has no block for {name}"
    assert block.group(1).strip() == table.strip(), f"{name}: run `python -m experiments.report`"


def test_variant_options_name_their_results_and_reach_every_run():
  """--tag writes results beside the standard ones, --experts picks the configurations, --gin reaches the runs."""
  from experiments import common
  args = expert_count.parser().parse_args(["--quick", "--tag", "8k", "--experts", "0,8", "--gin", "X.y=1"])
  assert common.result_name("expert_count", args) == "expert_count_8k"
  assert common.result_name("expert_count", expert_count.parser().parse_args([])) == "expert_count"
  assert args.experts == (0, 8) and expert_count.parser().parse_args([]).experts == expert_count.EXPERTS
  assert "X.y=1" in common.setting(args)["extra"]
  assert expert_count.overrides(0, wide=8, d_ff=512)[-1] == "ModelConfig.d_ff=4096"
  assert expert_count.parser().parse_args(["--wide", "2,8"]).wide == (2, 8)


def test_loss_at_interpolates_between_evaluations():
  from experiments import common
  curve = [(200, 5.0), (400, 4.0), (600, 3.5)]
  assert common.loss_at(curve, 300) == 4.5 and common.loss_at(curve, 600) == 3.5
  assert common.loss_at(curve, 800) is None
  with pytest.raises(SystemExit, match="outside the runs' evaluations"):
    common.mean_loss_at([{"eval_curve": curve}], 100)



def test_run_cache_key_follows_the_resolved_configuration():
  """Bindings that resolve to the same configs share a cached run (a dense twin under a sparse-layout --gin);
  a real difference does not."""
  from switchx import gin_config
  from switchx.config import MoeConfig
  from experiments import common

  def key(*bindings):
    gin_config.parse(["models/switch_cpu", "runs/demo"], list(bindings))
    return common.run_key([gin_config.model_config(), gin_config.train_config(), gin_config.data_config()])

  dense = expert_count.overrides(0)
  assert key(*dense) == key("ModelConfig.encoder_sparse='every:2'", *dense)
  assert key("TrainConfig.seed=1", *dense) == key(*dense, "TrainConfig.seed=1")
  assert key(*dense) != key(*dense, "TrainConfig.seed=1") != key("MoeConfig.num_experts=16")
  assert key(*dense) != key(*dense, "MoeConfig.expert_dtype='float32'")

  # A field added later with a default that keeps the old behaviour leaves the key (and the cache) alone.
  @dataclasses.dataclass(frozen=True)
  class Before:
    width: int = 4
    inner: MoeConfig = dataclasses.field(default_factory=MoeConfig)

  @dataclasses.dataclass(frozen=True)
  class After(Before):
    new_knob: str = "off"

  assert common.run_key([Before(width=8)]) == common.run_key([After(width=8)])
  assert common.run_key([Before(width=8)]) != common.run_key([After(width=8, new_knob="on")])
  assert common.run_key([Before()]) != common.run_key([Before(inner=MoeConfig(num_experts=4))])

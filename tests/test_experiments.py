"""Each reproduction script runs end to end in --quick mode (tiny model, a few steps) and writes its table, JSON and
plot; the experiments README quotes the committed full-run results exactly."""

import json
import re
from pathlib import Path

import pytest

from experiments import capacity_factor, expert_count, init_scale, report, sparse_vs_dense

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  return tmp_path_factory.mktemp("experiments")


@pytest.mark.parametrize("script,name", [(expert_count, "expert_count"), (capacity_factor, "capacity_factor"),
                                         (sparse_vs_dense, "sparse_vs_dense"), (init_scale, "init_scale")])
def test_script_quick_mode(script, name, work):
  out = work / "results"
  script.main(["--quick", "--out", str(out), "--work_dir", str(work / "runs")])
  payload = json.loads((out / f"{name}.json").read_text())
  assert payload["command"] and payload["rows"]
  assert (out / f"{name}.md").read_text().count("|") > 8
  assert (out / f"{name}.png").stat().st_size > 1000


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


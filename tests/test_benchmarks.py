"""The benchmarks run end to end in --quick mode (tiny shapes) and write their table and JSON."""

import json
import re

import pytest


def test_benchmarks_quick(tmp_path):
  pytest.importorskip("torch", reason="case 1 compares against transformers (the interop extra)")
  from benchmarks import run
  results = run.main(["--quick", "--out", str(tmp_path)])
  assert {r["case"] for r in results} == {1, 2, 3, 4, 5, 6}
  payload = json.loads((tmp_path / "bench.json").read_text())
  assert payload["meta"]["bandwidth_gbs"] > 0
  one = [r for r in results if r["case"] == 1][0]
  assert one["switchx_tokens_per_s"] > 0 and one["transformers_tokens_per_s"] > 0 and one["speedup"] > 0
  # transformers in both settings; the headline ratio is against the faster one: the smaller of the two ratios
  assert one["transformers_autocast_tokens_per_s"] > 0 and one["baseline"] in ("float32", "autocast")
  assert one["speedup"] == min(one["speedup_vs_autocast"], one["speedup_vs_float32"])
  assert one["speedup"] == one[f"speedup_vs_{one['baseline']}"]
  three = {r["moments"]: r for r in results if r["case"] == 3}
  for r in three.values():
    assert r["floor_ratio"] > 1 and r["peak_bytes_per_param"] > 0 and r["xla_temp_bytes_per_param"] > 0
  # What stays alive between steps is the training state: float32 parameters and AdamW's two moments, 4 bytes
  # each or 2 in bfloat16 (the batch adds a little at these tiny shapes); more would mean a copy kept somewhere.
  assert 12.0 <= three["float32"]["state_bytes_per_param"] < 12.5, three["float32"]["state_bytes_per_param"]
  assert 8.0 <= three["bfloat16"]["state_bytes_per_param"] < 8.5, three["bfloat16"]["state_bytes_per_param"]
  four = {r["weights"]: r for r in results if r["case"] == 4}
  # float32 parameters, and where the model's dtype is not float32 also the weights cast once (serving_params)
  assert set(four) == ({"float32"} if payload["meta"]["dtype"] == "float32" else {"float32", "serving_params"})
  for r in four.values():
    assert r["switchx_tokens_per_s"] > 0 and r["transformers_tokens_per_s"] > 0
    assert r["transformers_autocast_tokens_per_s"] > 0 and "times" in r and len(r["times"]) == 3
    assert r["token_agreement"] > 0.5   # same weights, greedy: the two decoders mostly pick the same tokens
  five = [r for r in results if r["case"] == 5][0]
  # 3 phases x (switchx, transformers float32, and beside bfloat16 switchx transformers under autocast)
  assert all(ms > 0 for ms in five["ms"].values())
  assert len(five["ms"]) == (9 if five["dtype"] == "bfloat16" else 6) and five["dtype"] == payload["meta"]["dtype"]
  assert "| transformers float32 |" in (tmp_path / "bench.md").read_text()
  six = [r for r in results if r["case"] == 6][0]
  assert six["adamw_ms"] > 0 and six["sgd_ms"] > 0 and six["extra_floor_ms"] > 0
  assert (tmp_path / "case3_scaling.png").stat().st_size > 0
  assert "Case 1" in (tmp_path / "bench.md").read_text()


def test_gpu_benchmark_quick(tmp_path):
  """benchmarks.gpu runs on a CPU in --quick mode: Switch-Base-8 and its dense twin (same shapes, no experts), each
  dispatch path, decoding; MFU is left out where the device's peak is unknown (a CPU)."""
  from benchmarks import gpu
  rows = gpu.main(["--quick", "--out", str(tmp_path), "--peak_tflops", "1"])
  train = [r for r in rows if r["name"] != "decode"]
  assert [r["dispatch"] for r in train] == ["einsum", "-", "index", "ragged"]
  assert train[1]["experts"] == 0 and train[1]["train_flops_per_token"] < train[0]["train_flops_per_token"] * 1.01
  for r in train:   # MFU = training FLOPs per token x tokens/s / peak (1 TFLOP/s given)
    assert r["tokens_per_s"] > 0 and r["mfu"] == pytest.approx(r["train_flops_per_token"] * r["tokens_per_s"] / 1e12)
  assert rows[-1]["name"] == "decode" and rows[-1]["tokens_per_s"] > 0
  assert "Switch-Base-8 / dense step time" in (tmp_path / "gpu.md").read_text()
  assert gpu.peak_flops(0.0) is None          # a CPU: no known peak, so no MFU


@pytest.mark.parametrize("argv", [["--phase", "forward + backward"], ["--framework", "transformers", "--autocast"]])
def test_trace_quick(argv):
  """benchmarks.trace splits a phase's time by op; the dots are among the ops it finds."""
  if "transformers" in argv:
    pytest.importorskip("torch", reason="the transformers trace needs the interop extra")
  from benchmarks import trace
  result = trace.main(["--quick", "--steps", "2", *argv])
  assert result["wall_ms"] > 0 and result["op_ms"] > 0
  names = " ".join(result["ops"])
  if "transformers" not in argv:   # grouped by op kind: no instruction's .N suffix left
    assert not any(re.search(r"\.\d+$", kind) for kind in result["ops"]), list(result["ops"])
  assert ("aten::mm" in names or "aten::addmm" in names) if "transformers" in argv else ("ynn" in names or "dot" in names)

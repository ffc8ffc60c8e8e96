"""switchx benchmarks: `make bench` (full) or `python -m benchmarks.run --quick` (seconds; the tests run it).

Cases (numbers are ratios against baselines measured in the same run, programs alternated A B A B ...):
  1. training step tokens/s, switchx vs transformers' PyTorch SwitchTransformers (float32 and bfloat16 autocast;
     the ratio against the faster), at 8 and 128 experts
  2. Switch step time vs its FLOP-matched dense twin, at 8 and 32 experts
  3. expert-count scaling at fixed tokens and active FLOPs (E = 8, 32, 128, 512), per dispatch path: step time,
     peak memory per parameter, and step time over the memory-traffic floor
  4. greedy decoding tokens/s with the KV cache, switchx vs transformers' generate (float32 and autocast)
  5. where case 1's step time goes: forward, backward, optimizer, in both frameworks (float32)
  6. what AdamW costs in cases 2 and 3: the same step with AdamW and with plain SGD
Writes benchmarks/results/bench.{md,json} (and case 3 as case3_scaling.png) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import programs, timing

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = (8, 128, 32)           # batch, encoder length, decoder length (case 1 and 2)
QUICK_SIZE = dict(d_model=64, d_ff=128, vocab_size=512, num_layers=2)   # --quick: compiles in seconds
MOMENT_BYTES = {"float32": 4, "bfloat16": 2}
CASE3_SIZE = dict(d_model=128, d_ff=512, vocab_size=8192)   # case 3's smaller model: 512 experts fit in memory


def threads() -> int:
  return len(os.sched_getaffinity(0))


def cpu() -> tuple[str, bool]:
  """(model name, whether it has bfloat16 matrix instructions: AVX512-BF16 or AMX-BF16)."""
  name, flags = platform.processor() or platform.machine(), set()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        name = line.split(":", 1)[1].strip()
      elif line.startswith("flags"):
        flags = set(line.split(":", 1)[1].split())
        break
  except OSError:
    pass
  return name, bool(flags & {"avx512_bf16", "amx_bf16"})


def default_dtype() -> str:
  """bfloat16 where the CPU multiplies it natively; elsewhere bfloat16 matmuls are emulated and slower than
  float32 (AMD EPYC Zen 2: 1,463 vs 1,829 tokens/s on case 1 at 8 experts), so float32."""
  return "bfloat16" if cpu()[1] else "float32"


def case_train_vs_transformers(experts: int, dtype: str, quick: bool, rounds: int, repeats: int) -> dict:
  import torch
  torch.set_num_threads(threads())
  kw = dict(QUICK_SIZE) if quick else {}
  config = programs.case1_config(experts, dtype=dtype, **kw)
  host = programs.batch(config, *BATCH)
  ours, num_params = programs.switchx_step(config, host)
  capacity = programs.hf_capacity(config, BATCH[1])
  theirs = {name: programs.hf_step(config.replace(dtype="float32"), host, capacity, autocast=name.endswith("autocast"))
            for name in HF_SETTINGS}
  times = timing.alternate({"switchx": ours, **theirs}, rounds, repeats)
  tokens = BATCH[0] * (BATCH[1] + BATCH[2])
  return {"case": 1, "experts": experts, "dtype": dtype, "params": num_params,
          "switchx_tokens_per_s": tokens / statistics.median(times["switchx"]),
          **against_transformers(times, "switchx", tokens), "times": times}


HF_SETTINGS = ("transformers", "transformers autocast")   # float32, and the forward under bfloat16 autocast


def against_transformers(times: dict, ours: str, tokens: int) -> dict:
  """transformers' tokens/s in each setting and switchx's speedup against each (median over rounds of
  t(transformers) / t(ours)) and against the faster one, the baseline its users would run: the smaller of the
  two speedups."""
  ratios = {"float32": timing.median_ratio(times, "transformers", ours),
            "autocast": timing.median_ratio(times, "transformers autocast", ours)}
  baseline = min(ratios, key=ratios.get)
  return {"transformers_tokens_per_s": tokens / statistics.median(times["transformers"]),
          "transformers_autocast_tokens_per_s": tokens / statistics.median(times["transformers autocast"]),
          "speedup_vs_float32": ratios["float32"], "speedup_vs_autocast": ratios["autocast"],
          "baseline": baseline, "speedup": ratios[baseline]}


def case_switch_vs_dense(experts: int, dtype: str, quick: bool, rounds: int, repeats: int) -> dict:
  kw = dict(QUICK_SIZE) if quick else {}
  sparse = programs.case1_config(experts, dtype=dtype, **kw)
  dense = programs.case1_config(experts, dtype=dtype, sparse=False, **kw)
  host = programs.batch(sparse, *BATCH)
  switch_step, _ = programs.switchx_step(sparse, host)
  dense_step, _ = programs.switchx_step(dense, host)
  times = timing.alternate({"switch": switch_step, "dense": dense_step}, rounds, repeats)
  return {"case": 2, "experts": experts, "dtype": dtype, "step_ratio": timing.median_ratio(times, "switch", "dense"),
          "switch_ms": 1000 * statistics.median(times["switch"]), "dense_ms": 1000 * statistics.median(times["dense"])}


WEIGHTS = {"float32": "float32, cast in each call", "serving_params": "serving_params, made once"}


def case_decode(experts: int, dtype: str, quick: bool, rounds: int, repeats: int) -> list[dict]:
  """Greedy decoding with the KV cache: batch 8, 128 encoder tokens, 32 generated tokens per row. One row per
  switchx program (float32 parameters; in bfloat16 also serving_params' weights cast once), each against the
  transformers times of the same alternation."""
  import tempfile

  import torch
  torch.set_num_threads(threads())
  kw = dict(QUICK_SIZE) if quick else {}
  config = programs.case1_config(experts, dtype=dtype, **kw)
  batch, inputs_length, new_tokens = BATCH[0], BATCH[1], 8 if quick else BATCH[2]
  encoder_tokens = programs.batch(config, batch, inputs_length, 1)["encoder_input_tokens"]
  with tempfile.TemporaryDirectory() as workdir:
    steps, produced = programs.decode_programs(config, encoder_tokens, new_tokens, workdir)
    times = timing.alternate(steps, rounds, repeats)
  hf_tokens, tokens = produced["transformers"][:, 1:1 + new_tokens], batch * new_tokens
  rows = []
  for name in (n for n in steps if n.startswith("switchx")):
    # switchx stops when every row has produced EOS (id 1) and writes 0 after it: a row's length runs through
    # its first EOS; the loop ran for the longest row.
    ours_tokens = produced[name]
    lengths = [int(np.argmax(row == 1)) + 1 if (row == 1).any() else new_tokens for row in ours_tokens]
    agree = float(np.mean([np.mean(o[:n] == t[:n]) for o, t, n in zip(ours_tokens, hf_tokens, lengths)]))
    rows.append({"case": 4, "experts": experts, "dtype": dtype, "new_tokens": new_tokens,
                 "weights": "serving_params" if name.endswith("serving") else "float32",
                 "switchx_steps": max(lengths), "switchx_tokens_per_s": tokens / statistics.median(times[name]),
                 **against_transformers(times, name, tokens), "token_agreement": agree,
                 "times": {name: times[name], **{h: times[h] for h in HF_SETTINGS}}})
  return rows


def case_profile(experts: int, dtype: str, quick: bool, rounds: int, repeats: int) -> dict:
  """Where case 1's step time goes: forward, forward + backward, full step, for switchx in `dtype` and for
  transformers in its two settings (float32; autocast where switchx runs bfloat16), alternated in one run."""
  import torch
  torch.set_num_threads(threads())
  config = programs.case1_config(experts, dtype=dtype, **(dict(QUICK_SIZE) if quick else {}))
  host = programs.batch(config, *BATCH)
  ours = programs.switchx_phases(config, host)
  theirs = config.replace(dtype="float32")
  capacity = programs.hf_capacity(config, BATCH[1])
  programs_ = {f"switchx {k}": v for k, v in ours.items()}
  for name in HF_SETTINGS if dtype == "bfloat16" else HF_SETTINGS[:1]:
    programs_ |= {f"{name} {k}": v for k, v in
                  programs.hf_phases(theirs, host, capacity, autocast=name.endswith("autocast")).items()}
  times = timing.alternate(programs_, rounds, repeats)
  return {"case": 5, "experts": experts, "dtype": dtype,
          "ms": {k: 1000 * statistics.median(v) for k, v in times.items()}}


def case_optimizer_share(model: str, dtype: str, quick: bool, rounds: int, repeats: int, bandwidth: float,
                         moments: str = "float32") -> dict:
  """What AdamW costs in a step: the same real training step with AdamW and with plain SGD (no optimizer state),
  alternated. Models: case 2's Switch at 32 experts ("switch-32") and its dense twin ("dense"), and case 3's
  512-expert model ("case3-512", index dispatch). moments: AdamW's moments' dtype."""
  kw = dict(QUICK_SIZE) if quick else {}
  if model == "case3-512":
    kw = kw or dict(CASE3_SIZE)
    config = programs.case1_config(8 if quick else 512, dtype=dtype, dispatch="index", **kw)
  else:
    config = programs.case1_config(8 if quick else 32, dtype=dtype, sparse=model != "dense", **kw)
  host = programs.batch(config, *BATCH)
  adamw, num_params = programs.switchx_step(config, host, moments=moments)
  sgd, _ = programs.switchx_step(config, host, optimizer="sgd")
  times = timing.alternate({"adamw": adamw, "sgd": sgd}, rounds, repeats)
  adamw_s, sgd_s = statistics.median(times["adamw"]), statistics.median(times["sgd"])
  # AdamW beyond SGD moves at least the two moments, read and written: 16 bytes per parameter in float32.
  return {"case": 6, "model": model, "dtype": dtype, "moments": moments, "params": num_params,
          "adamw_ms": 1000 * adamw_s, "sgd_ms": 1000 * sgd_s, "extra_ms": 1000 * (adamw_s - sgd_s),
          "extra_floor_ms": 1000 * 4 * MOMENT_BYTES[moments] * num_params / bandwidth, "times": times}


def step_in_fresh_process(config_args: dict, batch: tuple, rounds: int, repeats: int,
                          moments: str = "float32") -> dict:
  """Runs benchmarks.memory in a fresh process (peak RSS is per process): step time and memory."""
  payload = json.dumps({"config": config_args, "batch": batch, "moments": moments, "rounds": rounds,
                        "repeats": repeats})
  out = subprocess.run([sys.executable, "-m", "benchmarks.memory", payload], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def case_expert_scaling(experts: int, dispatch: str, dtype: str, quick: bool, rounds: int, repeats: int,
                        bandwidth: float, moments: str = "float32") -> dict:
  """Fixed tokens and active FLOPs; a smaller model than case 1 so 512 experts fit in memory. moments: AdamW's
  moments' dtype (TrainConfig.adam_moments_dtype)."""
  size = dict(QUICK_SIZE) if quick else dict(CASE3_SIZE)
  config_args = dict(num_experts=experts, dtype=dtype, dispatch=dispatch, **size)
  # One program per row, timed in the process that measures its memory (so it compiles once).
  memory = step_in_fresh_process(config_args, BATCH, rounds, repeats, moments)
  step_s, num_params = memory["step_s"], memory["params"]
  # AdamW: params read, grads written (4 + 4 bytes), the two moments read and written (4 x 4 in float32).
  floor_bytes = (8 + 4 * MOMENT_BYTES[moments]) * num_params
  return {"case": 3, "experts": experts, "dispatch": dispatch, "dtype": dtype, "moments": moments,
          "params": num_params,
          "step_ms": 1000 * step_s, "floor_ms": 1000 * floor_bytes / bandwidth,
          "floor_ratio": step_s / (floor_bytes / bandwidth),
          "peak_bytes_per_param": memory["peak_bytes"] / num_params,
          "state_bytes_per_param": memory["state_bytes"] / num_params,
          "xla_temp_bytes_per_param": memory["xla_temp_bytes"] / num_params,
          "times": {"step": memory["step_times_s"]}}


def _autocast(r: dict) -> str:
  value = r.get("transformers_autocast_tokens_per_s")
  return "-" if value is None else f"{value:,.0f}"      # rows measured before autocast was


def _speedup(r: dict) -> str:
  return f"{r['speedup']:.2f}x" + (f" ({r['baseline']})" if "baseline" in r else " (float32)")


def table(results: list[dict], meta: dict) -> str:
  units = meta.get("bf16_matrix_units")
  lines = [f"switchx benchmarks ({meta['when']}, {meta['machine']}"
           f"{'' if units is None else (', bfloat16 matrix units' if units else ', no bfloat16 matrix units')}, "
           f"{meta['threads']} threads, copy bandwidth {meta['bandwidth_gbs']:.1f} GB/s"
           f"{', QUICK' if meta['quick'] else ''})"]
  earlier_runs = {}
  for r in results:
    if "when" in r:   # kept from an earlier run by --merge
      earlier_runs.setdefault(r["when"], set()).add(r["case"])
  if earlier_runs:
    lines[0] += "; earlier runs: " + "; ".join(
        f"case{'s' if len(c) > 1 else ''} {', '.join(map(str, sorted(c)))} from {when}"
        for when, c in sorted(earlier_runs.items()))
  lines.append("")
  one = [r for r in results if r["case"] == 1]
  if one:
    lines += ["Case 1. Training step (fwd + bwd + AdamW), batch 8 x (128 + 32) tokens; target >= 1.5x the faster "
              "transformers setting (float32, or its forward under torch.autocast bfloat16).", "",
              "| experts | switchx dtype | params | switchx tokens/s | transformers float32 | transformers autocast | "
              "switchx / faster transformers |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['experts']} | {r['dtype']} | {r['params'] / 1e6:.1f}M | {r['switchx_tokens_per_s']:,.0f} | "
              f"{r['transformers_tokens_per_s']:,.0f} | {_autocast(r)} | {_speedup(r)} |" for r in one]
    lines.append("")
  two = [r for r in results if r["case"] == 2]
  if two:
    lines += ["Case 2. Switch step time over its FLOP-matched dense twin; target <= 1.15x (paper, TPU: 1.6x "
              "at capacity factor 1.0).", "", "| experts | dtype | switch ms | dense ms | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['experts']} | {r['dtype']} | {r['switch_ms']:.0f} | {r['dense_ms']:.0f} | "
              f"{r['step_ratio']:.2f}x |" for r in two]
    lines.append("")
  three = [r for r in results if r["case"] == 3]
  if three:
    lines += ["Case 3. Expert scaling at fixed tokens and active FLOPs (d_model 128, d_ff 512); floor = bytes a "
              "step must move (parameters read and gradients written, 8 per parameter, and AdamW's two moments "
              "read and written: 16 more in float32, 8 in bfloat16) / copy bandwidth; targets at 512 experts: "
              "<= 1.5x floor, <= 12 bytes/parameter.", "",
              "Peak = the process's peak resident memory; of it, state = the training state's arrays, XLA temps = "
              "the step's temporary buffer (gradients, activations), the rest the runtime's and the allocator's.",
              "",
              "| experts | dispatch | dtype | AdamW moments | params | step ms | floor ms | step / floor | "
              "peak bytes / param | of which state | XLA temps |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['experts']} | {r['dispatch']} | {r['dtype']} | {r.get('moments', 'float32')} | "
              f"{r['params'] / 1e6:.1f}M | {r['step_ms']:.0f} | "
              f"{r['floor_ms']:.0f} | {r['floor_ratio']:.2f}x | {r['peak_bytes_per_param']:.1f} | "
              f"{r['state_bytes_per_param']:.1f} | {r['xla_temp_bytes_per_param']:.1f} |" for r in three]
    lines.append("")
  four = [r for r in results if r["case"] == 4]
  if four:
    lines += ["Case 4. Greedy decoding with the KV cache, batch 8 x 128 encoder tokens, same weights in both; "
              "target >= 2x. Agreement = fraction of generated tokens equal to transformers' (float32: ~1; "
              "bfloat16 drifts once a near-tie flips).", "",
              "switchx's weights: float32 parameters, cast to the dtype inside every call, or "
              "decode.serving_params made once beforehand, as `switchx decode` does (matmul weights cast to the "
              "dtype, the tied logits' table transposed, the embedding kept float32 for the lookup); both against "
              "the transformers times of the same alternation.", "",
              "| experts | switchx dtype | switchx weights | new tokens | switchx tokens/s | transformers float32 | "
              "transformers autocast | switchx / faster transformers | agreement |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['experts']} | {r['dtype']} | {WEIGHTS[r.get('weights', 'float32')]} | {r['new_tokens']} | "
              f"{r['switchx_tokens_per_s']:,.0f} | {r['transformers_tokens_per_s']:,.0f} | {_autocast(r)} | "
              f"{_speedup(r)} | {r['token_agreement']:.2f} |" for r in four]
    lines.append("")
  five = [r for r in results if r["case"] == 5]
  if five:
    lines += ["Profile of case 1: median ms of each phase, measured alternately in one run per row group (the "
              "no-grad forward of transformers skips autograd bookkeeping, so it is a lower bound); switchx in the "
              "group's dtype, transformers in float32 and, beside bfloat16 switchx, under autocast.", "",
              "| experts | framework | forward | backward (fwd+bwd - fwd) | optimizer and rest | full step |",
              "|---|---|---|---|---|---|"]
    for r in five:
      dtype = r.get("dtype", "float32")            # rows measured before the bfloat16 profile: float32
      for who in ("switchx", *HF_SETTINGS):
        if f"{who} full step" not in r["ms"]:
          continue
        f, fb, full = (r["ms"][f"{who} {k}"] for k in ("forward", "forward + backward", "full step"))
        label = {"switchx": f"switchx {dtype}", "transformers": "transformers float32"}.get(who, who)
        lines.append(f"| {r['experts']} | {label} | {f:.0f} | {fb - f:.0f} | {full - fb:.0f} | {full:.0f} |")
    lines.append("")
  six = [r for r in results if r["case"] == 6]
  if six:
    lines += ["Optimizer share (cases 2 and 3): the same training step with AdamW and with plain SGD, alternated; "
              "AdamW's extra time against its floor (the two moments read and written, 16 bytes per parameter in "
              "float32, 8 in bfloat16, at the copy bandwidth).", "",
              "| model | dtype | AdamW moments | params | AdamW step ms | SGD step ms | AdamW - SGD ms | its floor ms |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['dtype']} | {r.get('moments', 'float32')} | {r['params'] / 1e6:.1f}M | "
              f"{r['adamw_ms']:.0f} | {r['sgd_ms']:.0f} | {r['extra_ms']:.0f} | {r['extra_floor_ms']:.0f} |"
              for r in six]
    by_model = {r["model"]: r for r in six if r.get("moments", "float32") == "float32"}
    if {"switch-32", "dense"} <= by_model.keys():
      s32, dense = by_model["switch-32"], by_model["dense"]
      lines += ["", f"Switch-32 / dense: {s32['adamw_ms'] / dense['adamw_ms']:.2f}x with AdamW, "
                    f"{s32['sgd_ms'] / dense['sgd_ms']:.2f}x with SGD."]
    lines.append("")
  return "\n".join(lines)


def plot_scaling(results: list[dict], path: Path) -> bool:
  """Case 3 as a figure: step time over the memory-traffic floor and peak bytes per parameter against the
  number of experts, one line per dispatch path and dtype, with the targets (and the AdamW state, 12 bytes per
  parameter) drawn in. Returns False (and writes nothing) when the results hold no case 3."""
  three = [r for r in results if r["case"] == 3]
  if not three:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(10, 4))
  series = lambda r: (r["dispatch"], r["dtype"], r.get("moments", "float32"))
  for dispatch, dtype, moments in dict.fromkeys(map(series, three)):
    rows = sorted((r for r in three if series(r) == (dispatch, dtype, moments)), key=lambda r: r["experts"])
    experts = [r["experts"] for r in rows]
    label = f"{dispatch}, {dtype}" + ("" if moments == "float32" else f", {moments} AdamW moments")
    style = "o-" if moments == "float32" else "s"
    time_ax.plot(experts, [r["floor_ratio"] for r in rows], style, label=label)
    memory_ax.plot(experts, [r["peak_bytes_per_param"] for r in rows], style, label=label)
  time_ax.axhline(1.5, color="gray", linestyle="--", label="target at 512 experts (1.5x)")
  memory_ax.axhline(12, color="gray", linestyle="--", label="target at 512 experts = float32 AdamW's state (12)")
  from matplotlib.ticker import ScalarFormatter
  for ax, ylabel in ((time_ax, "step time / memory-traffic floor"), (memory_ax, "peak bytes per parameter")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["experts"] for r in three}))
    for axis in (ax.xaxis, ax.yaxis):
      axis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("experts (fixed tokens and active FLOPs)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.suptitle("Case 3: expert-count scaling (AdamW training step)")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: checks the benchmarks run")
  p.add_argument("--cases", default="1,2,3,4,5,6", help="comma-separated case numbers")
  p.add_argument("--dtype", default="auto", help="switchx activation dtype (parameters stay float32); auto: "
                 "bfloat16 where the CPU has bfloat16 matrix instructions, else float32")
  p.add_argument("--out", default=str(RESULTS))
  p.add_argument("--merge", action="store_true",
                 help="replace only the cases run now in an existing bench.json (the others keep their figures)")
  args = p.parse_args(argv)
  if args.dtype == "auto":
    args.dtype = default_dtype()
  dtypes = tuple(dict.fromkeys(("float32", args.dtype)))  # full runs measure float32 too
  cases = {int(c) for c in args.cases.split(",")}
  rounds, repeats = (2, 1) if args.quick else (7, 3)
  bandwidth = timing.copy_bandwidth(32 * 2**20 if args.quick else 512 * 2**20)
  cpu_name, native_bf16 = cpu()
  meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {cpu_name}",
          "bf16_matrix_units": native_bf16, "dtype": args.dtype,
          "threads": threads(), "bandwidth_gbs": bandwidth / 1e9, "quick": args.quick}
  results = []
  if 1 in cases:
    for experts in ((8,) if args.quick else (8, 128)):
      for dtype in ((args.dtype,) if args.quick else dtypes):
        results.append(case_train_vs_transformers(experts, dtype, args.quick, rounds, repeats))
  if 2 in cases:
    for experts in ((8,) if args.quick else (8, 32)):
      for dtype in ((args.dtype,) if args.quick else dtypes):
        results.append(case_switch_vs_dense(experts, dtype, args.quick, rounds, repeats))
  if 3 in cases:
    grid = [(8, "index")] if args.quick else [(e, d) for e in (8, 32, 128, 512) for d in ("einsum", "index")]
    for dtype in ((args.dtype,) if args.quick else dtypes):
      for experts, dispatch in grid:
        results.append(case_expert_scaling(experts, dispatch, dtype, args.quick, max(rounds // 2, 1), repeats,
                                           bandwidth))
    # AdamW with bfloat16 moments (8 instead of 12 bytes of state per parameter), where the target is set.
    for experts, dispatch in ([(8, "index")] if args.quick else [(512, "einsum"), (512, "index")]):
      results.append(case_expert_scaling(experts, dispatch, args.dtype, args.quick, max(rounds // 2, 1), repeats,
                                         bandwidth, moments="bfloat16"))
  if 4 in cases:
    for dtype in ((args.dtype,) if args.quick else dtypes):
      results.extend(case_decode(8, dtype, args.quick, rounds, repeats))
  if 5 in cases:
    for experts in ((8,) if args.quick else (8, 128)):
      for dtype in ((args.dtype,) if args.quick else dtypes):
        results.append(case_profile(experts, dtype, args.quick, rounds, repeats))
  if 6 in cases:
    for model in (("switch-32",) if args.quick else ("switch-32", "dense", "case3-512")):
      results.append(case_optimizer_share(model, args.dtype, args.quick, rounds, repeats, bandwidth))
    if not args.quick:
      results.append(case_optimizer_share("case3-512", args.dtype, args.quick, rounds, repeats, bandwidth,
                                          moments="bfloat16"))
  if args.merge and (out_json := Path(args.out) / "bench.json").exists():
    # Keep the earlier run's results for the cases not rerun now (each case's ratios are measured within itself).
    earlier = json.loads(out_json.read_text())
    kept = [r for r in earlier["results"] if r["case"] not in cases]
    for r in kept:
      r.setdefault("when", earlier["meta"]["when"])
    results = sorted(kept + results, key=lambda r: r["case"])
    meta["merged_from"] = earlier["meta"]
  text = table(results, meta)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "bench.md").write_text(text + "\n")
  (out / "bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
  if plot_scaling(results, out / "case3_scaling.png"):
    text += f"\nCase 3 as a figure: {out / 'case3_scaling.png'}\n"
  print(text)
  return results


if __name__ == "__main__":
  main()

"""GPU benchmark, one command: `python -m benchmarks.gpu` (one accelerator; `--quick`: tiny shapes, runs on a CPU).

Rows (each timed as everywhere here: warm-up calls, then the median over alternated rounds):
  1. Switch-Base-8 training step (the released architecture: d_model 768, 12+12 layers, every other FFN 8
     experts, bfloat16 activations, float32 parameters, Adafactor) at the paper's Base batch and lengths, and its
     FLOP-matched dense twin (the same model, every FFN dense): tokens/s, MFU and peak device memory; the
     Switch / dense step ratio.
  2. The same Switch step with each dispatch path (einsum, index, ragged = dropless via jax.lax.ragged_dot) at 8
     and 128 experts.
  3. Greedy decoding tokens/s with the KV cache (batch 32, 512 encoder tokens, 64 new tokens).
MFU = 3 x forward FLOPs per token (switchx params' count: every matmul, attention included) x tokens/s / the
device's peak dense bfloat16 FLOP/s (experiments/gpu_scaling.PEAK_BF16, or --peak_tflops). Peak memory is the
device's peak_bytes_in_use where the backend reports it (GPUs, TPUs), else XLA's temporary buffer of the step.
Writes benchmarks/results/gpu.{md,json}. Targets (issue 32): MFU >= 40% for the Switch-Base-8 step on one H200,
Switch / dense step time <= 1.15x. Not run on a device yet (no session has had one). On a lent machine whose
image lacks gin-config / tensorboardX, install them as experiments/gpu_scaling.py's docstring says.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import programs, timing
from switchx import gin_config, model_stats

RESULTS = Path(__file__).resolve().parent / "results"
BASE = dict(batch=(128, 512, 114), rounds=5, repeats=2, decode=(32, 512, 64))     # the paper's Base run shape
QUICK = dict(batch=(4, 32, 8), rounds=2, repeats=1, decode=(2, 16, 4),
             size=["ModelConfig.d_model=64", "ModelConfig.num_heads=2", "ModelConfig.head_dim=32",
                   "ModelConfig.d_ff=128", "ModelConfig.num_encoder_layers=2", "ModelConfig.num_decoder_layers=2",
                   "ModelConfig.vocab_size=512", "MoeConfig.group_size=64"])


def model(preset: str, settings: dict, **moe):
  """A preset in bfloat16 (the quick size in --quick), with MoeConfig fields changed."""
  bindings = ["ModelConfig.dtype='bfloat16'", *settings.get("size", []),
              *[f"MoeConfig.{k}={v!r}" for k, v in moe.items()]]
  gin_config.parse([preset], bindings)
  return gin_config.model_config()


def peak_flops(override_tflops: float) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  from experiments.gpu_scaling import PEAK_BF16
  return PEAK_BF16.get(jax.devices()[0].device_kind)


def device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def train_row(name: str, config, settings: dict, peak: float | None, optimizer: str = "adafactor") -> dict:
  batch_size, inputs_length, targets_length = settings["batch"]
  host = programs.batch(config, batch_size, inputs_length, targets_length)
  step, num_params = programs.switchx_step(config, host, optimizer=optimizer)
  times = timing.alternate({name: step}, settings["rounds"], settings["repeats"])[name]
  step_s = statistics.median(times)
  tokens = batch_size * (inputs_length + targets_length)
  flops = 3 * model_stats.flops_per_token(config, inputs_length, targets_length)
  temps = step.compiled().memory_analysis().temp_size_in_bytes
  return {"name": name, "experts": config.moe.num_experts if config.is_sparse else 0,
          "dispatch": config.moe.dispatch if config.is_sparse else "-", "params": num_params, "step_s": step_s,
          "tokens_per_s": tokens / step_s, "train_flops_per_token": flops,
          "mfu": None if peak is None else flops * tokens / step_s / peak,
          "peak_bytes": device_peak_bytes(), "xla_temp_bytes": temps, "times": times}


def decode_row(config, settings: dict) -> dict:
  from switchx import decode
  from switchx.config import DecodeConfig
  from switchx.models.encoder_decoder import EncoderDecoder
  from flax import linen as nn
  rows, inputs_length, new_tokens = settings["decode"]
  tokens = programs.batch(config, rows, inputs_length, 1)["encoder_input_tokens"]
  init = jax.jit(EncoderDecoder(config).init)
  params = nn.unbox(init(jax.random.PRNGKey(0), tokens[:1], tokens[:1, :8])["params"])
  params = decode.serving_params(config, params)
  settings_ = DecodeConfig(strategy="greedy", max_decode_length=new_tokens)

  def step():
    jax.block_until_ready(decode.generate(config, params, tokens, settings_).tokens)

  times = timing.alternate({"decode": step}, settings["rounds"], settings["repeats"])["decode"]
  return {"name": "decode", "experts": config.moe.num_experts, "rows": rows, "new_tokens": new_tokens,
          "tokens_per_s": rows * new_tokens / statistics.median(times), "times": times}


def table(rows: list[dict], meta: dict) -> str:
  gib = 2 ** 30
  lines = [f"switchx GPU benchmark ({meta['when']}, {meta['device']}{', QUICK' if meta['quick'] else ''}; batch "
           f"{meta['batch'][0]} x ({meta['batch'][1]} + {meta['batch'][2]}) tokens, bfloat16, Adafactor)", "",
           "| model | experts | dispatch | params | step ms | tokens/s | MFU | peak memory GiB | XLA temps GiB |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in (r for r in rows if r["name"] != "decode"):
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / gib:.1f}"
    lines.append(f"| {r['name']} | {r['experts']} | {r['dispatch']} | {r['params'] / 1e6:.0f}M | "
                 f"{1000 * r['step_s']:.0f} | {r['tokens_per_s']:,.0f} | {mfu} | {peak} | "
                 f"{r['xla_temp_bytes'] / gib:.2f} |")
  lines += ["", f"Switch-Base-8 / dense step time: {meta['switch_dense_ratio']:.2f}x (target <= 1.15x)."]
  for r in (r for r in rows if r["name"] == "decode"):
    lines.append(f"Greedy decoding, Switch-Base-8, {r['rows']} rows x {r['new_tokens']} new tokens: "
                 f"{r['tokens_per_s']:,.0f} tokens/s.")
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU, seconds): checks the script works")
  p.add_argument("--out", default=str(RESULTS))
  p.add_argument("--peak_tflops", type=float, default=0.0, help="the device's peak bfloat16 TFLOP/s (default: "
                 "looked up by device kind)")
  args = p.parse_args(argv)
  settings = QUICK if args.quick else BASE
  peak = peak_flops(args.peak_tflops)
  switch = model("models/switch_base_8", settings)
  dense = switch.replace(encoder_sparse="none", decoder_sparse="none")     # the same shapes: the same FLOPs
  rows = [train_row("switch-base-8", switch, settings, peak), train_row("dense twin", dense, settings, peak)]
  for experts in (8,) if args.quick else (8, 128):
    for dispatch in ("einsum", "index", "ragged"):
      if experts == 8 and dispatch == switch.moe.dispatch:
        continue                                                    # row 1 already measured it
      config = model(f"models/switch_base_{experts}", settings, dispatch=dispatch)
      rows.append(train_row(f"switch-base-{experts}", config, settings, peak))
  rows.append(decode_row(switch, settings))
  meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "device": jax.devices()[0].device_kind, "quick": args.quick,
          "batch": settings["batch"], "peak_flops": peak, "switch_dense_ratio": rows[0]["step_s"] / rows[1]["step_s"]}
  text = table(rows, meta)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "gpu.md").write_text(text + "\n")
  (out / "gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  print(text)
  return rows


if __name__ == "__main__":
  main()

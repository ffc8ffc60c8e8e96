"""Dense vs Switch-8 / 32 / 128 at Switch-Base width on one GPU, for a fixed token budget: held-out loss, tokens/s
and MFU, through the same trainer, tables and plots as the CPU experiments.

    python -m experiments.gpu_scaling                 # one H200-class GPU: 4 models x 1 seed, ~6 min of device time
    python -m experiments.gpu_scaling --seeds 3       # error bars (~3x the time)
    python -m experiments.gpu_scaling --quick         # seconds on a CPU: checks the script (tests run it)

The model is Switch-Base's width (d_model 768, 12 heads x 64, d_ff 3072, ReLU, every other FFN sparse, top-1,
capacity factor 1.25 / 2.0, balance loss 1e-2, router z-loss 1e-3, float32 router, init scale 0.1) with 4+4
layers instead of 12+12 so that four models fit in minutes, trained in bfloat16 (parameters float32) with
Adafactor at a constant 0.01 on the docstring corpus (experiments/corpus.py) with an 8k SentencePiece
vocabulary, batch 128 x (512 inputs + 114 targets), the paper's lengths. MFU = training FLOPs per token (3x
the forward FLOPs of `switchx params`, which count every matmul: projections, attention, FFN / experts,
router, logits) x tokens/s / the device's peak dense bfloat16 FLOP/s (a table below; --peak_tflops for others).

On the lent H200 (its image has jax, flax, optax, orbax, sentencepiece, matplotlib, but not gin-config or
tensorboardX): download those two as wheels here (`pip download --no-deps -d .whl gin-config==0.5.0
tensorboardX==2.6.5`), carry `.whl`, and run
`pip install -q --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python3 -m
experiments.gpu_scaling --out $OUT`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from experiments import common, expert_count

EXPERTS = (0, 8, 32, 128)
QUICK_EXPERTS = (0, 8)
# Peak dense bfloat16 FLOP/s by jax's device_kind (vendor data sheets, without sparsity).
PEAK_BF16 = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "TPU v5p": 459e12,
             "TPU v4": 275e12}

SIZE = ["ModelConfig.d_model=768", "ModelConfig.num_heads=12", "ModelConfig.head_dim=64", "ModelConfig.d_ff=3072",
        "ModelConfig.num_encoder_layers=4", "ModelConfig.num_decoder_layers=4", "ModelConfig.vocab_size=8192",
        "DataConfig.tokenizer_vocab_size=8092", "ModelConfig.relative_attention_num_buckets=32",
        "ModelConfig.relative_attention_max_distance=128", "MoeConfig.group_size=4096", "TrainConfig.eval_batches=4"]
# What the quick mode keeps too: the precision, layout, dispatch and router losses of the full run.
RECIPE = ["ModelConfig.dtype='bfloat16'", "ModelConfig.encoder_sparse='every:2'",
          "ModelConfig.decoder_sparse='every:2'", "MoeConfig.router_z_loss_coef=0.001", "MoeConfig.dispatch='einsum'"]
FULL = dict(preset="models/switch_cpu", steps=600, eval_every=100, batch_size=128, inputs_length=512,
            targets_length=114, extra=SIZE + RECIPE)
QUICK = dict(common.QUICK, extra=common.QUICK["extra"] + RECIPE)


def parser():
  p = common.parser(__doc__.splitlines()[0], experts=EXPERTS)
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="the device's peak bfloat16 TFLOP/s (default: from the device kind; required elsewhere)")
  p.set_defaults(seeds=1, work_dir="/tmp/switchx_gpu_scaling")
  return p


def device_peak(args) -> tuple[str, float | None]:
  import jax
  kind = jax.devices()[0].device_kind
  if args.peak_tflops:
    return kind, args.peak_tflops * 1e12
  return kind, PEAK_BF16.get(kind)


def main(argv=None) -> dict:
  args = parser().parse_args(argv)
  kind, peak = device_peak(args)
  if not args.quick and peak is None:
    raise SystemExit(f"no peak FLOP/s known for device {kind!r}: pass --peak_tflops (its dense bfloat16 peak).")
  if args.quick:
    base = dict(QUICK, seeds=1, extra=[*QUICK["extra"], *args.gin])
  else:
    base = dict(FULL, seeds=args.seeds, extra=[*FULL["extra"], *args.gin])
    if args.steps:
      base["steps"] = args.steps
    if args.corpus == "docstrings":
      from experiments import corpus
      path = corpus.build(Path(args.work_dir) / "docstrings.jsonl")
      base["extra"] += ["DataConfig.source='text'", f"DataConfig.paths=('{path}',)"]
  rows, curves = [], {}
  for experts in (QUICK_EXPERTS if args.quick else args.experts):
    runs = [common.run(expert_count.label(experts), expert_count.overrides(experts), seed, base, args.work_dir)
            for seed in range(base["seeds"])]
    mean, spread = common.mean_spread([r["final_eval_loss"] for r in runs])
    tokens_per_s = statistics.fmean(r["tokens_per_s"] or 0.0 for r in runs)
    flops = runs[0]["flops_per_token"]
    rows.append({"experts": experts, "total_params": runs[0]["total_params"],
                 "active_params": runs[0]["active_params"], "flops_per_token": flops, "eval_loss_mean": mean,
                 "eval_loss_spread": spread, "tokens_per_s": tokens_per_s,
                 "mfu": None if not peak else 3 * flops * tokens_per_s / peak, "runs": runs})
    curves[expert_count.label(experts)] = [r["eval_curve"] for r in runs]
  dense = next((row for row in rows if row["experts"] == 0), None)
  tokens = base["steps"] * base["batch_size"] * (base["inputs_length"] + base["targets_length"])
  lines = [f"Device: {kind}; {base['steps']} steps of {base['batch_size']} x ({base['inputs_length']} + "
           f"{base['targets_length']}) tokens ({tokens / 1e6:.1f}M tokens per run), held-out loss mean ± half-range "
           f"over {base['seeds']} seed(s); MFU = 3 x forward FLOPs per token x tokens/s / peak "
           f"({'unknown' if not peak else f'{peak / 1e12:.0f} TFLOP/s'}).", "",
           "| model | parameters | active | held-out loss | vs dense | tokens/s | MFU | step time vs dense |",
           "|---|---|---|---|---|---|---|---|"]
  for row in rows:
    versus = "-" if dense is None else f"{row['eval_loss_mean'] - dense['eval_loss_mean']:+.3f}"
    ratio = "-" if not (dense and row["tokens_per_s"]) else f"{dense['tokens_per_s'] / row['tokens_per_s']:.2f}x"
    mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    lines.append(f"| {expert_count.label(row['experts'])} | {row['total_params'] / 1e6:.1f}M | "
                 f"{row['active_params'] / 1e6:.1f}M | {common.fmt(row['eval_loss_mean'], row['eval_loss_spread'])} | "
                 f"{versus} | {row['tokens_per_s']:,.0f} | {mfu} | {ratio} |")
  name = common.result_name("gpu_scaling", args)
  common.plot(Path(args.out) / f"{name}.png", curves, f"Held-out loss on one {kind}: Switch vs dense")
  common.write(name, args.out, {"setting": base, "device": kind, "peak_flops": peak, "rows": rows},
               "\n".join(lines), common.command_line(), where="one CPU, --quick" if args.quick else kind)
  return {"rows": rows}


if __name__ == "__main__":
  main()

"""AdamW with its two moments stored in bfloat16 instead of float32 (TrainConfig.adam_moments_dtype): 8 instead
of 12 bytes of training state per parameter. Does the model train as well? Same Switch model, data and seeds.

    python -m experiments.adam_moments            # full: 2 dtypes x 2 seeds, 1,000 steps
    python -m experiments.adam_moments --quick    # seconds
"""

from __future__ import annotations

from pathlib import Path

from experiments import common

DTYPES = ("float32", "bfloat16")
ADAMW = ["TrainConfig.optimizer='adamw'", "TrainConfig.learning_rate=0.001", "MoeConfig.num_experts=8"]


def main(argv=None) -> dict:
  args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
  base = common.setting(args)
  rows, curves = [], {}
  for dtype in DTYPES:
    runs = [common.run(f"adamw-{dtype}", [*ADAMW, f"TrainConfig.adam_moments_dtype='{dtype}'"], seed, base,
                       args.work_dir) for seed in range(base["seeds"])]
    mean, spread = common.mean_spread([r["final_eval_loss"] for r in runs])
    rows.append({"moments": dtype, "eval_loss_mean": mean, "eval_loss_spread": spread,
                 "per_seed": [r["final_eval_loss"] for r in runs],
                 "tokens_per_s": [r["tokens_per_s"] for r in runs], "runs": runs})
    curves[f"AdamW, {dtype} moments"] = [r["eval_curve"] for r in runs]
  lines = [f"Switch (8 experts), AdamW at a constant 1e-3 (b1 0.9, b2 0.98), held-out loss after {base['steps']} "
           f"steps over {base['seeds']} seed(s) (mean ± half-range; per-seed values listed; seed k of one row and "
           "seed k of the other share initialisation and data).", "",
           "| AdamW moments | state bytes / parameter | held-out loss | per seed | tokens/s |", "|---|---|---|---|---|"]
  for row in rows:
    per_seed = ", ".join(f"{v:.3f}" for v in row["per_seed"])
    speed = ", ".join(f"{v:,.0f}" for v in row["tokens_per_s"] if v)
    state_bytes = 4 + 2 * {"float32": 4, "bfloat16": 2}[row["moments"]]   # float32 parameters + two moments
    lines.append(f"| {row['moments']} | {state_bytes} | {common.fmt(row['eval_loss_mean'], row['eval_loss_spread'])} "
                 f"| {per_seed} | {speed} |")
  name = common.result_name("adam_moments", args)
  common.plot(Path(args.out) / f"{name}.png", curves, "Held-out loss: AdamW moments in float32 vs bfloat16")
  common.write(name, args.out, {"setting": base, "rows": rows}, "\n".join(lines), common.command_line())
  return {"rows": rows}


if __name__ == "__main__":
  main()

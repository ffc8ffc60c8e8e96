"""Initialisation scale (Switch paper, Table 3): truncated-normal init scale 0.1 vs 1.0 over seeds, early loss.
Paper (3.5k steps, 3 seeds): 0.1x -> -2.72 ± 0.01 neg. log perplexity; 1.0x -> -3.60 ± 0.68.

    python -m experiments.init_scale            # full: 2 scales x 3 seeds, short runs
    python -m experiments.init_scale --quick    # seconds
"""

from __future__ import annotations

from pathlib import Path

from experiments import common

SCALES = (0.1, 1.0)
EARLY_STEPS = 400


def main(argv=None) -> dict:
  parser = common.parser(__doc__.splitlines()[0])
  parser.set_defaults(seeds=3)
  args = parser.parse_args(argv)
  base = common.setting(args)
  if not args.quick and not args.steps:
    base.update(steps=EARLY_STEPS, eval_every=100)
  rows, curves = [], {}
  for scale in SCALES:
    runs = [common.run(f"init-{scale}", [f"ModelConfig.init_scale={scale}", "MoeConfig.num_experts=8"], seed, base,
                       args.work_dir) for seed in range(base["seeds"])]
    mean, spread = common.mean_spread([r["final_eval_loss"] for r in runs])
    rows.append({"init_scale": scale, "eval_loss_mean": mean, "eval_loss_spread": spread,
                 "per_seed": [r["final_eval_loss"] for r in runs], "runs": runs})
    curves[f"init scale {scale}"] = [r["eval_curve"] for r in runs]
  lines = [f"Switch (8 experts), held-out loss after {base['steps']} steps over {base['seeds']} seed(s) "
           "(mean ± half-range; per-seed values listed).", "",
           "| init scale | held-out loss | neg. log perplexity | per seed |", "|---|---|---|---|"]
  for row in rows:
    per_seed = ", ".join(f"{v:.3f}" for v in row["per_seed"])
    lines.append(f"| {row['init_scale']} | {common.fmt(row['eval_loss_mean'], row['eval_loss_spread'])} | "
                 f"{-row['eval_loss_mean']:.3f} | {per_seed} |")
  name = common.result_name("init_scale", args)
  common.plot(Path(args.out) / f"{name}.png", curves, "Held-out loss by initialisation scale")
  common.write(name, args.out, {"setting": base, "rows": rows}, "\n".join(lines), common.command_line())
  return {"rows": rows}


if __name__ == "__main__":
  main()

"""Load balancing at CPU scale: the Switch loss per group vs over the global batch vs bias balancing vs none, and
expert granularity at equal FLOPs.

    python -m experiments.balancing                     # every variant, 3 seeds, the regime study's setting
    python -m experiments.balancing --variants none,bias # some of them
    python -m experiments.balancing --quick              # seconds: checks the script works

Every variant is Switch-8 (every FFN sparse, top-1) on the regime study's chosen setting (experiments/regime.py,
`--candidate`), the same batches per seed, changing only how load is balanced:
  switch loss (group)    the Switch balance loss, coefficient 1e-2, f_e and P_e per routing group (the default)
  switch loss (global)   the same loss with f_e and P_e over the whole batch (MoeConfig.balance_loss_scope)
  bias (no loss)         no auxiliary loss; a per-expert selection bias moved by --bias_rate a step toward the
                         mean load (MoeConfig.bias_balance_rate; arXiv 2408.15664)
  none                   no balancing at all
  granularity G          G x 8 experts of d_ff / G each, top-G (Krajewski et al. 2024): the same parameters and
                         FLOPs per token as Switch-8, finer experts
Per variant: held-out loss, and over training the dropped fraction and the load's coefficient of variation
(averaged over layers), read from each run's metrics.jsonl.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from experiments import common, regime
from switchx.train.metrics import read_metrics

EXPERTS = 8


def granular(g: int, d_ff: int) -> list[str]:
  return [f"MoeConfig.num_experts={EXPERTS * g}", f"MoeConfig.expert_d_ff={d_ff // g}", f"MoeConfig.top_k={g}"]


def variants(args, d_ff: int) -> dict[str, list[str]]:
  all_variants = {
      "switch loss (group)": [],
      "switch loss (global)": ["MoeConfig.balance_loss_scope='global'"],
      "bias (no loss)": ["MoeConfig.load_balance_loss_coef=0.0", f"MoeConfig.bias_balance_rate={args.bias_rate}"],
      "none": ["MoeConfig.load_balance_loss_coef=0.0"],
      **{f"granularity {g}": granular(g, d_ff) for g in (2, 4)},
  }
  keys = {"group": "switch loss (group)", "global": "switch loss (global)", "bias": "bias (no loss)",
          "none": "none", "g2": "granularity 2", "g4": "granularity 4"}
  return {keys[v]: all_variants[keys[v]] for v in args.variants}


def parser():
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--candidate", default="narrow_ffn_docstrings", choices=tuple(regime.CANDIDATES),
                 help="the regime study's setting to run in (default: the one measured with 3 seeds)")
  p.add_argument("--variants", default=("group", "global", "bias", "none", "g2", "g4"),
                 type=lambda s: tuple(s.split(",")), help="comma-separated: group, global, bias, none, g2, g4")
  p.add_argument("--bias_rate", type=float, default=0.01, help="bias balancing's step (default 0.01)")
  p.add_argument("--switch_gin", action="append", default=[], help="a gin binding for every variant (repeatable), "
                 "e.g. MoeConfig.routed_scaling_factor=8.0")
  p.set_defaults(seeds=3)
  return p


def layer_mean_curve(metrics_file: Path, key: str) -> list[tuple[int, float]]:
  """(step, the mean over sparse layers of router/<layer>/<key>) at every logged training step."""
  curve = []
  for row in read_metrics(metrics_file.parent):
    values = [v for k, v in row.items() if k.startswith("router/") and k.endswith("/" + key)
              and not k.startswith("eval/")]
    if "loss" in row and values:
      curve.append((row["step"], statistics.fmean(values)))
  return curve


def main(argv=None) -> dict:
  args = parser().parse_args(argv)
  if args.quick:
    base = common.setting(args)
    d_ff = common.model_config(base).d_ff
    chosen = {"switch loss (group)": [], "bias (no loss)": ["MoeConfig.load_balance_loss_coef=0.0",
                                                              f"MoeConfig.bias_balance_rate={args.bias_rate}"],
              "granularity 2": granular(2, d_ff)}
  else:
    base = regime.candidate_base(regime.CANDIDATES[args.candidate][1], args)
    base["steps"] = args.steps or base["steps"]
    chosen = variants(args, common.model_config(base).d_ff)
  rows, curves, cv_curves = [], {}, {}
  for label, overrides in chosen.items():
    run_name = f"balancing-{args.candidate}-" + label.replace(" ", "_").replace("(", "").replace(")", "")
    runs = [common.run(run_name, [*common.all_sparse(EXPERTS), *overrides, *args.switch_gin], seed, base,
                       args.work_dir) for seed in range(base["seeds"])]
    mean, spread = common.mean_spread([r["final_eval_loss"] for r in runs])
    cv = [layer_mean_curve(Path(r["model_dir"]) / "metrics.jsonl", "load_cv") for r in runs]
    dropped = [layer_mean_curve(Path(r["model_dir"]) / "metrics.jsonl", "dropped_fraction") for r in runs]
    last = lambda curves_: statistics.fmean(c[-1][1] for c in curves_ if c) if any(curves_) else float("nan")
    rows.append({"variant": label, "overrides": overrides, "eval_loss_mean": mean, "eval_loss_spread": spread,
                 "final_load_cv": last(cv), "final_dropped_fraction": last(dropped),
                 "params": runs[0]["total_params"], "flops_per_token": runs[0]["flops_per_token"],
                 "load_cv_curves": cv, "dropped_curves": dropped, "runs": runs})
    curves[label] = [r["eval_curve"] for r in runs]
    cv_curves[label] = cv
  lines = [f"Switch-{EXPERTS}, {base['steps']} steps, mean ± half-range over {base['seeds']} seed(s); load CV and "
           "dropped fraction: mean over sparse layers at the last logged training step, mean over seeds.", "",
           "| variant | params | FLOPs / token | held-out loss | load CV | dropped |", "|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['variant']} | {row['params'] / 1e6:.2f}M | {row['flops_per_token'] / 1e6:.2f}M | "
                 f"{common.fmt(row['eval_loss_mean'], row['eval_loss_spread'])} | {row['final_load_cv']:.3f} | "
                 f"{100 * row['final_dropped_fraction']:.1f}% |")
  name = common.result_name("balancing", args)
  common.plot(Path(args.out) / f"{name}.png", curves, "Held-out loss by load-balancing method")
  common.plot(Path(args.out) / f"{name}_load_cv.png", cv_curves, "Load CV (mean over sparse layers)",
              ylabel="load coefficient of variation")
  common.write(name, args.out, {"setting": base, "rows": rows}, "\n".join(lines),
               common.command_line())
  return {"rows": rows}


if __name__ == "__main__":
  main()

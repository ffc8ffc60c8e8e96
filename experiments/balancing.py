"""Load balancing at CPU scale: the Switch loss per group vs over the global batch vs bias balancing vs none, and
expert granularity at equal FLOPs.

    python -m experiments.balancing                      # every variant, 3 seeds, the causal LM of lm_regime
    python -m experiments.balancing --variants none,bias # some of them (also: sequence)
    python -m experiments.balancing --setting encdec     # the encoder-decoder regime study's setting instead
    python -m experiments.balancing --quick              # seconds: checks the script works

Every variant is Switch-8 (every FFN sparse, top-1) in the causal LM where Switch beats dense (experiments/
lm_regime.py, README section 9; `--setting encdec`: the regime study's encoder-decoder), the same batches per
seed, changing only how load is balanced:
  switch loss (group)    the Switch balance loss, coefficient 1e-2, f_e and P_e per routing group (the default)
  switch loss (sequence) the same loss per sequence (MoeConfig.balance_loss_scope='sequence'; not run by default)
  switch loss (global)   the same loss with f_e and P_e over the whole batch (MoeConfig.balance_loss_scope)
  bias (no loss)         no auxiliary loss; a per-expert selection bias moved by --bias_rate a step toward the
                         mean load (MoeConfig.bias_balance_rate; arXiv 2408.15664)
  none                   no balancing at all
  granularity G          G x 8 experts of d_ff / G each, top-G (Krajewski et al. 2024): the same parameters and
                         FLOPs per token as Switch-8, finer experts (the Switch loss per group)
Per variant: held-out loss (beside the dense model's, in the LM setting), and over training the dropped fraction,
the load's coefficient of variation, max / mean load and router entropy (averaged over layers), read from each
run's metrics.jsonl; the bias values at the end for bias balancing.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from experiments import common, lm_regime, regime
from switchx.train.metrics import read_metrics

EXPERTS = 8


def granular(g: int, d_ff: int) -> list[str]:
  return [f"MoeConfig.num_experts={EXPERTS * g}", f"MoeConfig.expert_d_ff={d_ff // g}", f"MoeConfig.top_k={g}"]


def variants(args, d_ff: int) -> dict[str, list[str]]:
  all_variants = {
      "switch loss (group)": [],
      "switch loss (sequence)": ["MoeConfig.balance_loss_scope='sequence'"],
      "switch loss (global)": ["MoeConfig.balance_loss_scope='global'"],
      "bias (no loss)": ["MoeConfig.load_balance_loss_coef=0.0", f"MoeConfig.bias_balance_rate={args.bias_rate}"],
      "none": ["MoeConfig.load_balance_loss_coef=0.0"],
      **{f"granularity {g}": granular(g, d_ff) for g in (2, 4)},
  }
  keys = {"group": "switch loss (group)", "sequence": "switch loss (sequence)", "global": "switch loss (global)", "bias": "bias (no loss)",
          "none": "none", "g2": "granularity 2", "g4": "granularity 4"}
  return {keys[v]: all_variants[keys[v]] for v in args.variants}


def parser():
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--setting", default="lm", choices=("lm", "encdec"),
                 help="lm (default): the causal LM where Switch beats dense (experiments/lm_regime.py, README section "
                      "9); encdec: the encoder-decoder regime study's --candidate")
  p.add_argument("--candidate", default="narrow_ffn_docstrings", choices=tuple(regime.CANDIDATES),
                 help="with --setting encdec: the regime study's setting to run in")
  p.add_argument("--variants", default=("group", "global", "bias", "none", "g2", "g4"),
                 type=lambda s: tuple(s.split(",")), help="comma-separated: group, sequence, global, bias, none, g2, g4")
  p.add_argument("--bias_rate", type=float, default=0.01, help="bias balancing's step (default 0.01)")
  p.add_argument("--switch_gin", action="append", default=[], help="a gin binding for every variant (repeatable), "
                 "e.g. MoeConfig.routed_scaling_factor=8.0")
  p.set_defaults(seeds=3, work_dir="/tmp/switchx_experiments/lm")
  return p


def layer_mean_curve(metrics_file: Path, key: str) -> list[tuple[int, float]]:
  """(step, the mean over sparse layers of router/<layer>/<key>) at every logged training step; a per-rank list
  (dropped_fraction_by_rank) counts as its mean: the share of all (token, choice) pairs."""
  curve = []
  for row in read_metrics(metrics_file.parent):
    values = [statistics.fmean(v) if isinstance(v, list) else v for k, v in row.items()
              if k.startswith("router/") and k.endswith("/" + key) and not k.startswith("eval/")]
    if "loss" in row and values:
      curve.append((row["step"], statistics.fmean(values)))
  return curve


def last_router_value(metrics_file: Path, key: str) -> list:
  """Each sparse layer's router/<layer>/<key> at the last logged training step (e.g. the bias values)."""
  rows = [row for row in read_metrics(metrics_file.parent) if "loss" in row]
  return [v for k, v in sorted(rows[-1].items()) if k.startswith("router/") and k.endswith("/" + key)] if rows else []


def setting(args) -> tuple[dict, list[str], list[str]]:
  """(base, the Switch-8 bindings every variant starts from, the dense reference's bindings)."""
  if args.setting == "lm":
    return lm_regime.setting(args), [f"MoeConfig.num_experts={EXPERTS}"], lm_regime.DENSE
  if args.quick:
    base = common.setting(args)
  else:
    base = regime.candidate_base(regime.CANDIDATES[args.candidate][1], args)
    base["steps"] = args.steps or base["steps"]
  return base, common.all_sparse(EXPERTS), []


def main(argv=None) -> dict:
  args = parser().parse_args(argv)
  base, switch, dense_bindings = setting(args)
  d_ff = common.model_config(base).d_ff
  if args.quick:
    args.variants = ("group", "bias", "g2")
  chosen = variants(args, d_ff)
  prefix = "balancing-lm" if args.setting == "lm" else f"balancing-{args.candidate}"
  run_name = lambda label: f"{prefix}-" + label.replace(" ", "_").replace("(", "").replace(")", "")
  # Seed-major: every variant of seed 0 first, so an interrupted study already compares them on one seed.
  by_seed = []
  for seed in range(base["seeds"]):
    done = {label: common.run(run_name(label), [*switch, *overrides, *args.switch_gin], seed, base, args.work_dir)
            for label, overrides in chosen.items()}
    if args.setting == "lm":   # the reference every variant is read against (lm_regime's dense runs: cached)
      done["dense"] = common.run("lm-dense", dense_bindings, seed, base, args.work_dir)
    by_seed.append(done)
  dense = None
  if args.setting == "lm":
    dense_mean, dense_spread = common.mean_spread([d["dense"]["final_eval_loss"] for d in by_seed])
    dense = {"eval_loss_mean": dense_mean, "eval_loss_spread": dense_spread,
             "runs": [d["dense"] for d in by_seed]}
  rows, curves, cv_curves, dropped_curves = [], {}, {}, {}
  if dense:
    curves["dense"] = [r["eval_curve"] for r in dense["runs"]]
  for label, overrides in chosen.items():
    runs = [d[label] for d in by_seed]
    mean, spread = common.mean_spread([r["final_eval_loss"] for r in runs])
    metric_files = [Path(r["model_dir"]) / "metrics.jsonl" for r in runs]
    per_run = {key: [layer_mean_curve(f, key) for f in metric_files]
               for key in ("load_cv", "dropped_fraction", "dropped_fraction_by_rank", "max_mean_load",
                           "router_entropy", "idle_experts")}
    last = lambda key: (statistics.fmean(c[-1][1] for c in per_run[key] if c) if any(per_run[key])
                        else float("nan"))
    row = {"variant": label, "overrides": overrides, "eval_loss_mean": mean, "eval_loss_spread": spread,
           "gain_vs_dense": dense["eval_loss_mean"] - mean if dense else None,
           "clear_of_dense": (dense["eval_loss_mean"] - mean > 2 * max(spread, dense["eval_loss_spread"])
                              if dense and base["seeds"] > 1 else None),
           "final_load_cv": last("load_cv"), "final_dropped_fraction": last("dropped_fraction"),
           "final_max_mean_load": last("max_mean_load"), "final_router_entropy": last("router_entropy"),
           "final_idle_experts": last("idle_experts"),
           "mean_dropped_fraction": statistics.fmean(statistics.fmean(v for _, v in c) for c in
                                                     per_run["dropped_fraction"] if c),
           "mean_dropped_choices": statistics.fmean(statistics.fmean(v for _, v in c) for c in
                                                    per_run["dropped_fraction_by_rank"] if c),
           "final_bias": [last_router_value(f, "router_bias") for f in metric_files],
           "params": runs[0]["total_params"], "flops_per_token": runs[0]["flops_per_token"],
           "step_time_s": statistics.fmean(r["step_time_s"] or 0 for r in runs),
           "load_cv_curves": per_run["load_cv"], "dropped_curves": per_run["dropped_fraction"], "runs": runs}
    rows.append(row)
    curves[label] = [r["eval_curve"] for r in runs]
    cv_curves[label] = per_run["load_cv"]
    dropped_curves[label] = per_run["dropped_fraction"]
  where = ("the causal LM of experiments/lm_regime.py (README section 9)" if args.setting == "lm"
           else f"the encoder-decoder regime candidate {args.candidate}")
  lines = [f"Switch-{EXPERTS} in {where}, {base['steps']} steps, the same batches per seed; mean ± half-range over "
           f"{base['seeds']} seed(s). Router columns: mean over sparse layers at the last logged training step "
           "(over training: mean of every logged step), mean over seeds. Tokens dropped: no chosen expert took "
           "them; choices dropped: (token, choice) pairs over capacity (top-G: a token may lose its 2nd choice and "
           "keep its 1st). Entropy in nats (uniform over 8: "
           f"{math.log(EXPERTS):.2f}; over the G x 8 experts of granularity G: larger).", ""]
  if dense:
    lines[0] += (f" Dense (the same model, every FFN dense): {common.fmt(dense_mean, dense_spread)}; gain = dense "
                 "minus the row.")
  lines += ["| variant | params | FLOPs / token | held-out loss | gain vs dense | > 2x spread | load CV | max / mean "
            "load | tokens dropped (last) | tokens dropped (over training) | choices dropped (over training) | "
            "router entropy | step time |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    gain = "-" if row["gain_vs_dense"] is None else f"{row['gain_vs_dense']:+.3f}"
    clear = "-" if row["clear_of_dense"] is None else ("yes" if row["clear_of_dense"] else "no")
    lines.append(f"| {row['variant']} | {common.model_stats.format_count(row['params'])} | "
                 f"{common.model_stats.format_count(row['flops_per_token'])} | "
                 f"{common.fmt(row['eval_loss_mean'], row['eval_loss_spread'])} | {gain} | {clear} | "
                 f"{row['final_load_cv']:.3f} | {row['final_max_mean_load']:.2f} | "
                 f"{100 * row['final_dropped_fraction']:.1f}% | {100 * row['mean_dropped_fraction']:.1f}% | "
                 f"{100 * row['mean_dropped_choices']:.1f}% | "
                 f"{row['final_router_entropy']:.2f} | {row['step_time_s'] * 1e3:.0f} ms |")
  name = common.result_name("balancing", args)
  title = "Causal LM" if args.setting == "lm" else "Encoder-decoder"
  common.plot(Path(args.out) / f"{name}.png", curves, f"{title}: held-out loss by load-balancing method")
  common.plot(Path(args.out) / f"{name}_load_cv.png", cv_curves, "Load CV (mean over sparse layers)",
              ylabel="load coefficient of variation")
  common.plot(Path(args.out) / f"{name}_dropped.png", dropped_curves, "Dropped fraction (mean over sparse layers)",
              ylabel="fraction of tokens dropped")
  common.write(name, args.out, {"setting": base, "dense": dense, "rows": rows}, "\n".join(lines),
               common.command_line())
  return {"rows": rows, "dense": dense}


if __name__ == "__main__":
  main()

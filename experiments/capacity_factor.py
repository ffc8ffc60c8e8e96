"""Capacity factor and load balancing (Switch paper, Table 1): top-1 (Switch) and top-2 (MoE) at capacity factors
1.0 / 1.25 / 2.0, and the load-balancing loss switched off.

    python -m experiments.capacity_factor            # full
    python -m experiments.capacity_factor --quick    # seconds
"""

from __future__ import annotations

from pathlib import Path

from experiments import common

EXPERTS = 8
CASES = [  # (label, top_k, capacity factor, load-balance coefficient)
    ("switch cf 1.0", 1, 1.0, 0.01), ("switch cf 1.25", 1, 1.25, 0.01), ("switch cf 2.0", 1, 2.0, 0.01),
    ("moe top-2 cf 1.0", 2, 1.0, 0.01), ("moe top-2 cf 1.25", 2, 1.25, 0.01), ("moe top-2 cf 2.0", 2, 2.0, 0.01),
    ("switch cf 1.25, no balance loss", 1, 1.25, 0.0),
]
QUICK_CASES = [CASES[3]]   # top-2: the overrides with the most settings; one run keeps the test short


def overrides(top_k: int, factor: float, balance: float) -> list[str]:
  return [f"MoeConfig.num_experts={EXPERTS}", f"MoeConfig.top_k={top_k}", f"MoeConfig.train_capacity_factor={factor}",
          f"MoeConfig.load_balance_loss_coef={balance}"] + (["MoeConfig.normalize_gates=True"] if top_k == 2 else [])


def main(argv=None) -> dict:
  args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
  base = common.setting(args)
  rows, curves = [], {}
  for name, top_k, factor, balance in (QUICK_CASES if args.quick else CASES):
    runs = [common.run(name.replace(" ", "_").replace(",", ""), overrides(top_k, factor, balance), seed, base,
                       args.work_dir) for seed in range(base["seeds"])]
    mean, spread = common.mean_spread([r["final_eval_loss"] for r in runs])
    step_ms = 1000 * sum(r["step_time_s"] or 0 for r in runs) / len(runs)
    dropped = sum(r["dropped_fraction"] or 0 for r in runs) / len(runs)
    rows.append({"case": name, "top_k": top_k, "capacity_factor": factor, "balance_coef": balance,
                 "eval_loss_mean": mean, "eval_loss_spread": spread, "dropped_fraction": dropped,
                 "step_ms": step_ms, "runs": runs})
    curves[name] = [r["eval_curve"] for r in runs]
  lines = [f"{EXPERTS} experts, held-out loss after {base['steps']} steps (mean ± half-range over {base['seeds']} "
           "seed(s)); dropped = fraction of tokens no expert processed at the last logged step (training capacity).",
           "", "| model | capacity factor | balance coef | held-out loss | dropped | step time |", "|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['case'].split(' cf')[0]} | {row['capacity_factor']} | {row['balance_coef']} | "
                 f"{common.fmt(row['eval_loss_mean'], row['eval_loss_spread'])} | {100 * row['dropped_fraction']:.1f}% | "
                 f"{row['step_ms']:.0f} ms |")
  name = common.result_name("capacity_factor", args)
  common.plot(Path(args.out) / f"{name}.png", curves, "Held-out loss by capacity factor")
  common.write(name, args.out, {"setting": base, "rows": rows}, "\n".join(lines), common.command_line())
  return {"rows": rows}


if __name__ == "__main__":
  main()

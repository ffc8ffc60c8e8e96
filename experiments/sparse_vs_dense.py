"""Sparse vs dense at equal FLOPs per token (Switch paper: 64 experts reach T5-Base quality 7.5x faster in steps):
how many steps (and how much time) a Switch model needs to reach the dense model's final held-out loss.

    python -m experiments.sparse_vs_dense            # full (reuses expert_count's runs when they exist)
    python -m experiments.sparse_vs_dense --quick    # seconds
"""

from __future__ import annotations

from pathlib import Path

from experiments import common, expert_count

EXPERTS = (8, 32, 64)
QUICK_EXPERTS = (2,)


def parser():
  p = common.parser(__doc__.splitlines()[0], experts=EXPERTS)
  p.add_argument("--target_step", type=int, default=0,
                 help="the dense model's held-out loss at this step is the target (default: its final step)")
  return p


def main(argv=None) -> dict:
  args = parser().parse_args(argv)
  base = common.setting(args)
  seeds = range(base["seeds"])
  dense = [common.run("dense", expert_count.overrides(0), s, base, args.work_dir) for s in seeds]
  target_step = args.target_step or base["steps"]
  target = common.mean_loss_at(dense, target_step)[0]
  dense_step_s = sum(r["step_time_s"] or 0 for r in dense) / len(dense)
  rows, curves = [], {"dense": [r["eval_curve"] for r in dense]}
  for experts in (QUICK_EXPERTS if args.quick else args.experts):
    runs = [common.run(expert_count.label(experts), expert_count.overrides(experts), s, base, args.work_dir)
            for s in seeds]
    reached = [common.steps_to_reach(r["eval_curve"], target) for r in runs]
    step_s = sum(r["step_time_s"] or 0 for r in runs) / len(runs)
    speedups = [target_step / s for s in reached if s]
    rows.append({"experts": experts, "steps_to_dense_loss": reached, "step_time_ratio": step_s / max(dense_step_s, 1e-9),
                 "speedup_steps": common.mean_spread(speedups) if len(speedups) == len(reached) else None,
                 "runs": runs})
    curves[expert_count.label(experts)] = [r["eval_curve"] for r in runs]
  epoch = None if args.quick else common.steps_per_epoch(base, args.work_dir)
  lines = [f"Dense held-out loss at step {target_step} of {base['steps']}: {target:.3f} (mean of {len(dense)} "
           "seed(s)). Steps for each Switch model to reach it (held-out loss interpolated between evaluations)"
           + ("." if epoch is None else f"; one pass over the training text is {epoch:,.0f} steps."), "",
           "| model | steps to dense loss | speed-up in steps | step time vs dense | speed-up in time |", "|---|---|---|---|---|"]
  for row in rows:
    steps = ", ".join("not reached" if s is None else f"{s:.0f}" for s in row["steps_to_dense_loss"])
    if row["speedup_steps"]:
      mean, spread = row["speedup_steps"]
      speed, time_speed = common.fmt(mean, spread).replace(".000", ""), f"{mean / row['step_time_ratio']:.2f}x"
      speed += "x"
    else:
      speed, time_speed = "-", "-"
    lines.append(f"| {expert_count.label(row['experts'])} | {steps} | {speed} | {row['step_time_ratio']:.2f}x | "
                 f"{time_speed} |")
  name = common.result_name("sparse_vs_dense", args)
  common.plot(Path(args.out) / f"{name}.png", curves, "Held-out loss: Switch vs its FLOP-matched dense twin",
              epoch_steps=epoch)
  common.write(name, args.out, {"setting": base, "dense_target": target, "target_step": target_step, "rows": rows},
               "\n".join(lines), common.command_line())
  return {"rows": rows, "target": target}


if __name__ == "__main__":
  main()

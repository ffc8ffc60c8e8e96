"""Sparse upcycling (Komatsuzaki et al. 2022): does a dense model turned into a Switch model beat training on dense,
or a Switch model trained from scratch, for the same total compute?

    python -m experiments.upcycling            # full: N + M steps, 3 seeds
    python -m experiments.upcycling --quick    # seconds

Per seed: the dense model trains N steps (kept), then
  (a) dense continued: the dense model for N + M steps (a constant learning rate and the pipeline's fixed order
      make this the N-step run continued),
  (b) upcycled: the N-step dense model upcycled to Switch-E (every FFN's experts start as that FFN, fresh
      routers) and trained M more steps (its data pipeline starts again from the beginning),
  (c) Switch-E from scratch for N + M steps.
Switch-E and its dense twin have equal FLOPs per token, so the three arms cost the same compute; the table
compares their held-out loss at the end, the plot against total steps (the upcycled curve starts at N).
"""

from __future__ import annotations

from pathlib import Path

from experiments import common
from switchx.train.upcycle import upcycle

DENSE = common.DENSE


def parser():
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--experts", type=int, default=8, help="the upcycled / from-scratch Switch model's experts")
  p.add_argument("--dense_fraction", type=float, default=0.5, help="N as a share of the total steps N + M")
  p.add_argument("--reinit_fraction", type=float, default=0.0, help="Drop-Upcycling's share (0: plain)")
  p.set_defaults(seeds=3)
  return p


def main(argv=None) -> dict:
  args = parser().parse_args(argv)
  base = common.setting(args)
  total = base["steps"]
  pre = max(int(round(args.dense_fraction * total)), 1)
  switch = common.all_sparse(args.experts)
  arms = {"dense continued": [], "upcycled": [], f"switch-{args.experts} from scratch": []}
  for seed in range(base["seeds"]):
    dense_pre = common.run("dense-pre", DENSE, seed, dict(base, steps=pre, eval_every=pre), args.work_dir,
                           keep_model=True)
    arms["dense continued"].append(common.run("dense", DENSE, seed, base, args.work_dir))

    def trainer(model, train_config, data_config, model_dir, source=dense_pre["model_dir"]):
      return upcycle(source, model, train_config, data_config, model_dir=model_dir,
                     reinit_fraction=args.reinit_fraction, show_progress=False)

    rest = dict(base, steps=total - pre, eval_every=min(base["eval_every"], total - pre))
    upcycled = common.run("upcycled", switch, seed, rest, args.work_dir, trainer=trainer,
                          key_extra={"upcycled_from": DENSE, "steps": pre, "reinit": args.reinit_fraction})
    upcycled = dict(upcycled, eval_curve=[(pre + s, v) for s, v in upcycled["eval_curve"]])
    arms["upcycled"].append(upcycled)
    arms[f"switch-{args.experts} from scratch"].append(common.run(f"switch{args.experts}", switch, seed, base,
                                                                  args.work_dir))
  rows = []
  for label, runs in arms.items():
    mean, spread = common.mean_spread([r["final_eval_loss"] for r in runs])
    rows.append({"arm": label, "mean": mean, "spread": spread, "per_seed": [r["final_eval_loss"] for r in runs],
                 "runs": runs})
  dense = rows[0]
  lines = [f"Held-out loss after {total} steps of compute (dense {pre} steps, then {total - pre} more as each arm), "
           f"mean ± half-range over {base['seeds']} seed(s); gain = dense continued minus the arm.", "",
           "| arm | held-out loss | gain over dense continued |", "|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['arm']} | {common.fmt(row['mean'], row['spread'])} | {dense['mean'] - row['mean']:+.3f} |")
  name = common.result_name("upcycling", args)
  curves = {row["arm"]: [r["eval_curve"] for r in row["runs"]] for row in rows}
  common.plot(Path(args.out) / f"{name}.png", curves, f"Upcycling after {pre} dense steps: held-out loss vs steps")
  common.write(name, args.out, {"setting": base, "dense_steps": pre, "experts": args.experts, "rows": rows},
               "\n".join(lines), common.command_line())
  return {"rows": rows}


if __name__ == "__main__":
  main()

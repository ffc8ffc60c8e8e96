"""Sparse upcycling (Komatsuzaki et al. 2022): does a dense model turned into a Switch model beat training on dense,
or a Switch model trained from scratch, for the same total compute?

    python -m experiments.upcycling                  # full: the causal LM of lm_regime, N + M steps, 3 seeds
    python -m experiments.upcycling --setting encdec # the encoder-decoder setting of experiments/common.py
    python -m experiments.upcycling --quick          # seconds

Per seed: the dense model trains N steps (kept: a finished run, its schedule decayed), then for M more steps
  (a) dense continued: that model trained on, fresh optimizer state and schedule,
  (b) upcycled: that model upcycled to Switch-E (every FFN's experts start as that FFN, fresh routers) and trained
      on the same way,
both with their data continuing where the dense run stopped (upcycle --continue_data), so every arm sees each
text once; beside them, for N + M steps from scratch,
  (c) Switch-E and (d) the dense model (in the lm setting: lm_regime's own runs, from its cache).
Switch-E and its dense twin have equal FLOPs per token, so the four arms cost the same training compute (the
continued arms' two warm-ups aside); the table compares their held-out loss at the end, the plot against total
steps (the continued arms carry the dense run's first N steps).
"""

from __future__ import annotations

from pathlib import Path

import jax

from experiments import common, lm_regime
from switchx.train import restore
from switchx.train.loop import train
from switchx.train.upcycle import upcycle


def parser():
  p = common.parser(__doc__.splitlines()[0])
  lm_regime.add_setting_flag(p)
  p.add_argument("--experts", type=int, default=8, help="the upcycled / from-scratch Switch model's experts")
  p.add_argument("--dense_fraction", type=float, default=0.5, help="N as a share of the total steps N + M")
  p.add_argument("--reinit_fraction", type=float, default=0.0, help="Drop-Upcycling's share (0: plain)")
  p.set_defaults(seeds=3, work_dir="/tmp/switchx_experiments/lm")
  return p


def continue_dense(source: str, model, train_config, data_config, model_dir):
  """The dense run in `source` trained on: its parameters, a fresh optimizer state, its data's position."""
  loaded = restore.load_model(source)
  return train(model, train_config, data_config, model_dir=model_dir, show_progress=False, name="dense continued",
               init_params=jax.device_get(loaded.params), init_data_state=loaded.data_state)


def main(argv=None) -> dict:
  args = parser().parse_args(argv)
  base, dense, switch, prefix = lm_regime.family(args, args.experts)
  total = base["steps"]
  pre = max(int(round(args.dense_fraction * total)), 1)
  rest = dict(base, steps=total - pre, eval_every=min(base["eval_every"], total - pre))
  scratch = f"switch-{args.experts} from scratch"
  arms = {"dense continued": [], "upcycled": [], scratch: [], "dense from scratch": []}
  shift = lambda run, pre_run: dict(run, eval_curve=[*pre_run["eval_curve"],
                                                     *[(pre + s, v) for s, v in run["eval_curve"]]])
  for seed in range(base["seeds"]):
    dense_pre = common.run(f"{prefix}dense-pre", dense, seed, dict(base, steps=pre, eval_every=min(base["eval_every"],
                                                                                                     pre)),
                           args.work_dir, keep_model=True)

    def dense_trainer(model, train_config, data_config, model_dir, source=dense_pre["model_dir"]):
      return continue_dense(source, model, train_config, data_config, model_dir)

    def upcycle_trainer(model, train_config, data_config, model_dir, source=dense_pre["model_dir"]):
      return upcycle(source, model, train_config, data_config, model_dir=model_dir, continue_data=True,
                     reinit_fraction=args.reinit_fraction, show_progress=False)

    continued = common.run(f"{prefix}dense-continued", dense, seed, rest, args.work_dir, trainer=dense_trainer,
                           key_extra={"continued_from": dense, "steps": pre, "continue_data": True})
    upcycled = common.run(f"{prefix}upcycled", switch, seed, rest, args.work_dir, trainer=upcycle_trainer,
                          key_extra={"upcycled_from": dense, "steps": pre, "reinit": args.reinit_fraction,
                                     "continue_data": True})
    arms["dense continued"].append(shift(continued, dense_pre))
    arms["upcycled"].append(shift(upcycled, dense_pre))
    arms[scratch].append(common.run(f"{prefix}switch-{args.experts}", switch, seed, base, args.work_dir))
    arms["dense from scratch"].append(common.run(f"{prefix}dense", dense, seed, base, args.work_dir))
  rows = []
  for label, runs in arms.items():
    mean, spread = common.mean_spread([r["final_eval_loss"] for r in runs])
    rows.append({"arm": label, "mean": mean, "spread": spread, "per_seed": [r["final_eval_loss"] for r in runs],
                 "runs": runs})
  ref = rows[0]
  where = "the causal LM of experiments/lm_regime.py" if args.setting == "lm" else "the encoder-decoder setting"
  lines = [f"In {where}: held-out loss after {total} steps of compute (dense {pre} steps, then {total - pre} more as "
           f"each continued arm; the from-scratch arms {total} steps), mean ± half-range over {base['seeds']} "
           "seed(s); gain = dense continued minus the arm (positive: better), > 2x spread: the gain exceeds twice "
           "the larger half-range.", "",
           "| arm | held-out loss | gain over dense continued | > 2x spread |", "|---|---|---|---|"]
  for row in rows:
    gain = ref["mean"] - row["mean"]
    row["gain_over_dense_continued"] = gain
    clear = ("-" if row is ref or base["seeds"] < 2 else
             "yes" if abs(gain) > 2 * max(row["spread"], ref["spread"]) else "no")
    lines.append(f"| {row['arm']} | {common.fmt(row['mean'], row['spread'])} | {gain:+.3f} | {clear} |")
  name = common.result_name("upcycling", args)
  curves = {row["arm"]: [r["eval_curve"] for r in row["runs"]] for row in rows}
  common.plot(Path(args.out) / f"{name}.png", curves, f"Upcycling after {pre} dense steps: held-out loss vs steps")
  common.write(name, args.out, {"setting": base, "dense_steps": pre, "experts": args.experts, "rows": rows},
               "\n".join(lines), common.command_line())
  return {"rows": rows}


if __name__ == "__main__":
  main()

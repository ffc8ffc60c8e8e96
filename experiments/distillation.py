"""Distillation of a Switch teacher into its dense twin (Switch paper, Table 6: the student keeps ~30% of the
teacher's quality gain over the dense baseline): what share of the gain does a distilled student keep here?

    python -m experiments.distillation                  # full: the causal LM of lm_regime, 3 seeds
    python -m experiments.distillation --setting encdec # the encoder-decoder setting of experiments/common.py
    python -m experiments.distillation --quick          # seconds

Per seed: the teacher (Switch-E, every FFN sparse) and the dense baseline (its FLOP-matched dense twin) train
from scratch (in the lm setting: the dense run is lm_regime's; the teacher, lm_regime's Switch-E, is trained
again to keep its weights); the student (the dense twin again) trains as long on targets mixing --soft_weight
(the paper's 0.25) of the teacher's probabilities, starting from the teacher's non-expert weights. Kept gain = (dense -
student) / (dense - teacher), on held-out loss; only read where the teacher beats the dense model by more than
the seed spread (otherwise there is no gain to keep).
"""

from __future__ import annotations

from pathlib import Path

from experiments import common, lm_regime
from switchx.train.distill import distill


def parser():
  p = common.parser(__doc__.splitlines()[0])
  lm_regime.add_setting_flag(p)
  p.add_argument("--experts", type=int, default=8, help="the teacher's experts")
  p.add_argument("--soft_weight", type=float, default=0.25, help="weight of the teacher's probabilities")
  p.set_defaults(seeds=3, work_dir="/tmp/switchx_experiments/lm")
  return p


def main(argv=None) -> dict:
  args = parser().parse_args(argv)
  base, dense, switch, prefix = lm_regime.family(args, args.experts)
  # Its own cache entry: lm_regime's Switch runs kept no weights, and other scripts read them while this one runs.
  teacher_key = {"weights_kept": True} if args.setting == "lm" else None
  models = {"teacher": [], "dense": [], "student": []}
  for seed in range(base["seeds"]):
    teacher = common.run(f"{prefix}teacher{args.experts}", switch, seed, base, args.work_dir, keep_model=True,
                         key_extra=teacher_key)
    models["teacher"].append(teacher)
    models["dense"].append(common.run(f"{prefix}dense", dense, seed, base, args.work_dir))

    def trainer(model, train_config, data_config, model_dir, source=teacher["model_dir"]):
      return distill(source, model, train_config, data_config, model_dir=model_dir, show_progress=False)

    models["student"].append(common.run(f"{prefix}student", [*dense, f"TrainConfig.distill_soft_weight={args.soft_weight}"],
                                        seed, base, args.work_dir, trainer=trainer,
                                        key_extra={"teacher": switch}))
  stats = {k: common.mean_spread([r["final_eval_loss"] for r in runs]) for k, runs in models.items()}
  kept = [(d["final_eval_loss"] - s["final_eval_loss"]) / (d["final_eval_loss"] - t["final_eval_loss"])
          if d["final_eval_loss"] != t["final_eval_loss"] else None
          for t, d, s in zip(models["teacher"], models["dense"], models["student"])]
  gain = stats["dense"][0] - stats["teacher"][0]
  noise = max(stats["dense"][1], stats["teacher"][1])
  readable = gain > noise if base["seeds"] > 1 else None
  kept_mean = common.mean_spread([k for k in kept if k is not None]) if None not in kept else None
  where = "the causal LM of experiments/lm_regime.py" if args.setting == "lm" else "the encoder-decoder setting"
  lines = [f"In {where}: held-out loss after {base['steps']} steps, mean ± half-range over {base['seeds']} seed(s); teacher: switch-{args.experts}, student "
           f"and dense: its dense twin (equal FLOPs per token); soft weight {args.soft_weight}.", "",
           "| teacher | dense | student | teacher's gain | kept by the student | paper |", "|---|---|---|---|---|---|"]
  kept_cell = "-" if kept_mean is None else f"{100 * kept_mean[0]:.0f}% ± {100 * kept_mean[1]:.0f}%"
  if gain <= 0:
    kept_cell = f"({kept_cell}: not read, the teacher is no better than the dense model)"
  elif readable is False:
    kept_cell = f"({kept_cell}: not read, the teacher's gain is within the seed spread {noise:.3f})"
  lines.append(f"| {common.fmt(*stats['teacher'])} | {common.fmt(*stats['dense'])} | {common.fmt(*stats['student'])} "
               f"| {gain:+.3f} | {kept_cell} | ~30% |")
  name = common.result_name("distillation", args)
  curves = {k: [r["eval_curve"] for r in runs] for k, runs in models.items()}
  common.plot(Path(args.out) / f"{name}.png", curves, "Distillation: teacher, dense baseline, distilled student")
  common.write(name, args.out, {"setting": base, "rows": [{"model": k, "runs": v} for k, v in models.items()],
                                "kept_gain": kept, "teacher_gain": gain, "gain_readable": readable},
               "\n".join(lines), common.command_line())
  return {"kept": kept, "gain": gain}


if __name__ == "__main__":
  main()

"""Distillation of a Switch teacher into its dense twin (Switch paper, Table 6: the student keeps ~30% of the
teacher's quality gain over the dense baseline): what share of the gain does a distilled student keep here?

    python -m experiments.distillation                  # full: the causal LM of lm_regime, 3 seeds
    python -m experiments.distillation --setting encdec # the encoder-decoder setting of experiments/common.py
    python -m experiments.distillation --quick          # seconds

Per seed: the teacher (Switch-E, every FFN sparse) and the dense baseline (its FLOP-matched dense twin) train
from scratch (in the lm setting: the dense run is lm_regime's; the teacher, lm_regime's Switch-E, is trained
again to keep its weights); the student (the dense twin again) trains as long on targets mixing
--soft_weight (the paper's 0.25) of the teacher's probabilities, starting from the teacher's non-expert
weights. Kept gain = (dense - student) / (dense - teacher), on held-out loss; only read where the teacher beats
the dense model by more than the seed spread (otherwise there is no gain to keep). The control (the same start, hard targets only, as long)
separates what the teacher's probabilities add from what its weights and the extra training add: in a short run
a student that starts from a trained teacher's embeddings and attention has simply trained twice as long. The
fresh student (soft targets from a random start, as long) is distillation alone: beside the dense baseline (the
same start, hard targets) it shows what the teacher's probabilities are worth with nothing else changed.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from experiments import common, lm_regime
from switchx.train import restore
from switchx.train.distill import distill, student_params_from_teacher
from switchx.train.loop import train


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
  models = {"teacher": [], "dense": [], "student": [], "control": [], "fresh": []}
  for seed in range(base["seeds"]):
    teacher = common.run(f"{prefix}teacher{args.experts}", switch, seed, base, args.work_dir, keep_model=True,
                         key_extra=teacher_key)
    models["teacher"].append(teacher)
    models["dense"].append(common.run(f"{prefix}dense", dense, seed, base, args.work_dir))

    def trainer(model, train_config, data_config, model_dir, source=teacher["model_dir"]):
      return distill(source, model, train_config, data_config, model_dir=model_dir, show_progress=False)

    def fresh(model, train_config, data_config, model_dir, source=teacher["model_dir"]):
      return distill(source, model, train_config, data_config, model_dir=model_dir, show_progress=False,
                     init_from_teacher=False)

    def init_only(model, train_config, data_config, model_dir, source=teacher["model_dir"]):
      teacher_params = restore.load_model(source).params
      example = {"encoder_input_tokens": jnp.ones((1, 8), jnp.int32), "decoder_input_tokens": jnp.ones((1, 8), jnp.int32)}
      params = student_params_from_teacher(model, teacher_params, jax.random.PRNGKey(train_config.seed), example)
      return train(model, train_config, data_config, model_dir=model_dir, show_progress=False, name="init only",
                   init_params=params)

    soft = f"TrainConfig.distill_soft_weight={args.soft_weight}"
    models["student"].append(common.run(f"{prefix}student", [*dense, soft], seed, base, args.work_dir,
                                        trainer=trainer, key_extra={"teacher": switch}))
    models["control"].append(common.run(f"{prefix}student-init-only", dense, seed, base, args.work_dir,
                                        trainer=init_only, key_extra={"init_from_teacher": switch}))
    models["fresh"].append(common.run(f"{prefix}student-fresh", [*dense, soft], seed, base, args.work_dir,
                                      trainer=fresh, key_extra={"teacher": switch, "init_from_teacher": False}))
  losses = {k: [r["final_eval_loss"] for r in runs] for k, runs in models.items()}
  stats = {k: common.mean_spread(v) for k, v in losses.items()}
  share = lambda better, worse: [(w - b) / (d - t) if d != t else None for b, w, d, t in
                                 zip(losses[better], losses[worse], losses["dense"], losses["teacher"])]
  kept = share("student", "dense")               # the paper's measure: the student against the dense baseline
  kept_over_control = share("student", "control")  # what the teacher's probabilities add, the init held equal
  kept_fresh = share("fresh", "dense")           # distillation alone: a random start, soft targets vs hard
  gain = stats["dense"][0] - stats["teacher"][0]
  noise = max(stats["dense"][1], stats["teacher"][1])
  readable = gain > noise if base["seeds"] > 1 else None
  cell = lambda values: ("-" if None in values else
                         "{:.0f}% ± {:.0f}%".format(*(100 * x for x in common.mean_spread(values))))
  where = "the causal LM of experiments/lm_regime.py" if args.setting == "lm" else "the encoder-decoder setting"
  lines = [f"In {where}: held-out loss after {base['steps']} steps, mean ± half-range over {base['seeds']} seed(s); "
           f"teacher: switch-{args.experts}; dense: its dense twin (equal FLOPs per token) from scratch; student: the "
           f"dense twin started from the teacher's non-expert weights and trained as long on targets mixing "
           f"{args.soft_weight} of the teacher's probabilities (the paper's recipe); control: the same start, hard "
           "targets only; fresh student: soft targets as the student's, from a random start (distillation alone). "
           "Kept = the share of the teacher's gain over dense that the student keeps, against the "
           "dense model (the paper's measure), against the control (what the teacher's probabilities add to the teacher's "
           "start) and, for the fresh student, against dense (what they add to a random start).", "",
           "| model | held-out loss | vs dense |", "|---|---|---|"]
  for key, label in (("teacher", f"teacher: switch-{args.experts}"), ("dense", "dense"),
                     ("student", "student (teacher's init + soft targets)"),
                     ("control", "control (teacher's init, hard targets)"),
                     ("fresh", "fresh student (random init + soft targets)")):
    lines.append(f"| {label} | {common.fmt(*stats[key])} | {stats['dense'][0] - stats[key][0]:+.3f} |")
  kept_cells = [cell(kept), cell(kept_over_control), cell(kept_fresh)]
  if gain <= 0:
    kept_cells = [f"({c}: not read, the teacher is no better than the dense model)" for c in kept_cells]
  elif readable is False:
    kept_cells = [f"({c}: not read, the teacher's gain is within the seed spread {noise:.3f})" for c in kept_cells]
  lines += ["", "| teacher's gain | kept vs dense | kept vs control | fresh student kept vs dense | paper (vs dense) |",
            "|---|---|---|---|---|", f"| {gain:+.3f} | {' | '.join(kept_cells)} | ~30% |"]
  name = common.result_name("distillation", args)
  curves = {k: [r["eval_curve"] for r in runs] for k, runs in models.items()}
  common.plot(Path(args.out) / f"{name}.png", curves, "Distillation: teacher, dense, distilled student, control, fresh student")
  common.write(name, args.out, {"setting": base, "rows": [{"model": k, "runs": v} for k, v in models.items()],
                                "kept_gain": kept, "kept_gain_over_control": kept_over_control,
                                "kept_gain_fresh": kept_fresh,
                                "teacher_gain": gain, "gain_readable": readable},
               "\n".join(lines), common.command_line())
  return {"kept": kept, "kept_over_control": kept_over_control, "kept_fresh": kept_fresh, "gain": gain}


if __name__ == "__main__":
  main()

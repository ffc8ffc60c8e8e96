"""Sparse beats dense at equal FLOPs on a CPU: a small causal LM on the docstring corpus (issue 25's regime).

    python -m experiments.lm_regime                    # dense, control, Switch-8 and -32, 3 seeds (see README)
    python -m experiments.lm_regime --experts 8        # fewer Switch models
    python -m experiments.lm_regime --quick            # seconds: checks the script works

Every model is the decoder-only causal LM of configs/models/switch_lm_cpu.gin (d_model 64, 4 layers, d_ff 64),
trained on the same batches of the docstring corpus (no repetition) per seed:
  * dense: every FFN dense;
  * control: the dense model with a d_ff `--wide` (8) times wider: about Switch-8's parameters, 8x the FFN FLOPs;
  * Switch-E: every FFN a top-1 Switch layer of E experts of the dense FFN's size: the dense model's FLOPs.
The control gates the regime: it must beat dense by more than 3x the seed spread (the larger half-range of the
two) before any Switch row is read. Then each Switch row's gain over dense, against 2x its spread, and the
steps (and wall time) it needs to reach the dense model's final held-out loss (Figure 5's speed-up).

Why a causal LM: the encoder-decoder regime study (experiments/regime.py, README section 7) never passed the gate:
its span-corruption losses drop abruptly at a seed-dependent step, which made the seed spread larger than any
control's gain. Next-token prediction at this size learns smoothly, so the spread is small and the FFN
parameters' value shows.
"""

from __future__ import annotations

from pathlib import Path

from experiments import common

PRESET = "models/switch_lm_cpu"
EXPERTS = (8, 32)
SETTING = dict(preset=PRESET, steps=600, eval_every=100, batch_size=32, inputs_length=128, targets_length=32)
EXTRA = ["TrainConfig.optimizer='adafactor'", "TrainConfig.learning_rate=0.02", "TrainConfig.schedule='warmup_cosine'",
         "TrainConfig.warmup_steps=50", "TrainConfig.end_learning_rate_fraction=0.05"]
QUICK = dict(preset=PRESET, steps=4, eval_every=2, batch_size=4, inputs_length=24, targets_length=8,
             extra=["DecoderOnlyConfig.d_model=16", "DecoderOnlyConfig.num_heads=2", "DecoderOnlyConfig.num_kv_heads=2",
                    "DecoderOnlyConfig.d_ff=16", "DecoderOnlyConfig.num_layers=1",
                    "DataConfig.tokenizer_vocab_size=256",
                    "DecoderOnlyConfig.vocab_size=356", "MoeConfig.group_size=64", "TrainConfig.eval_batches=1"])
DENSE = ["DecoderOnlyConfig.sparse='none'"]


def parser():
  p = common.parser(__doc__.splitlines()[0], experts=EXPERTS)
  p.add_argument("--wide", type=int, default=8, help="the control's d_ff multiple (default 8: Switch-8's parameters)")
  p.add_argument("--switch_gin", action="append", default=[], help="a gin binding for the Switch models only "
                 "(repeatable), e.g. MoeConfig.routed_scaling_factor=8.0; the dense and control runs stay cached")
  p.set_defaults(seeds=3, work_dir="/tmp/switchx_experiments/lm")
  return p


def setting(args) -> dict:
  if args.quick:
    return dict(QUICK, seeds=1)
  base = dict(SETTING, seeds=args.seeds, extra=[*EXTRA, *args.gin])
  if args.steps:
    base["steps"] = args.steps
  from experiments import corpus
  path = corpus.build(Path(args.work_dir) / "docstrings.jsonl")
  base["extra"] += ["DataConfig.source='text'", f"DataConfig.paths=('{path}',)"]
  return base


def add_setting_flag(p) -> None:
  """--setting for the experiments that run in this study's causal LM or in the encoder-decoder (common.setting)."""
  p.add_argument("--setting", default="lm", choices=("lm", "encdec"),
                 help="lm (default): the causal LM where Switch beats dense (experiments/lm_regime.py, README section "
                      "9); encdec: the encoder-decoder of experiments/common.py")


def family(args, experts: int) -> tuple[dict, list[str], list[str], str]:
  """(base setting, the dense model's bindings, Switch-E's bindings, run-name prefix) for args.setting; the lm
  names are this study's, so its dense and Switch runs are found in its cache."""
  if args.setting == "lm":
    return setting(args), DENSE, [f"MoeConfig.num_experts={experts}"], "lm-"
  return common.setting(args), common.DENSE, common.all_sparse(experts), ""


def switch_label(experts: int, args) -> str:
  label = f"switch-{experts}"
  return label + (" [" + ", ".join(b.split(".", 1)[-1] for b in args.switch_gin) + "]" if args.switch_gin else "")


def main(argv=None) -> dict:
  args = parser().parse_args(argv)
  base = setting(args)
  seeds = range(base["seeds"])
  d_ff = common.model_config(base).d_ff
  models = {"dense": DENSE, f"control: d_ff x{args.wide}": [*DENSE, f"DecoderOnlyConfig.d_ff={args.wide * d_ff}"]}
  experts = (2,) if args.quick else args.experts
  for e in experts:
    models[switch_label(e, args)] = [f"MoeConfig.num_experts={e}", *args.switch_gin]
  def run_name(label):
    name = label.split(" [")[0].replace(": ", "-").replace(" ", "")
    if args.switch_gin and label.startswith("switch"):   # its own directory beside the plain Switch runs
      name += "-" + (args.tag or common.run_key([args.switch_gin]))
    return f"lm-{name}"
  # Seed-major: every model of seed 0 first, so an interrupted study already compares them on one seed.
  by_seed = [{label: common.run(run_name(label), overrides, s, base, args.work_dir)
              for label, overrides in models.items()} for s in seeds]
  results, curves = {}, {}
  for label in models:
    runs = [done[label] for done in by_seed]
    mean, spread = common.mean_spread([r["final_eval_loss"] for r in runs])
    results[label] = {"mean": mean, "spread": spread, "per_seed": [r["final_eval_loss"] for r in runs],
                      "total_params": runs[0]["total_params"], "active_params": runs[0]["active_params"],
                      "flops_per_token": runs[0]["flops_per_token"], "runs": runs}
    curves[label] = [r["eval_curve"] for r in runs]
  dense, control = results["dense"], results[f"control: d_ff x{args.wide}"]
  noise = max(dense["spread"], control["spread"])
  gate = (dense["mean"] - control["mean"] > 3 * noise) if base["seeds"] > 1 else None
  target = dense["mean"]                                     # the dense model's final held-out loss (seed mean)
  dense_step_s = sum(r["step_time_s"] or 0 for r in dense["runs"]) / len(dense["runs"])
  for label, row in results.items():
    row["gain"] = dense["mean"] - row["mean"]
    row["clear"] = row["gain"] > 2 * max(row["spread"], dense["spread"]) if base["seeds"] > 1 else None
    reached = [common.steps_to_reach(r["eval_curve"], target) for r in row["runs"]]
    row["steps_to_dense_loss"] = reached
    row["speedup_steps"] = common.mean_spread([base["steps"] / s for s in reached]) if all(reached) else None
    row["step_time_ratio"] = (sum(r["step_time_s"] or 0 for r in row["runs"]) / len(row["runs"])) / max(dense_step_s,
                                                                                                         1e-9)
  tokens = base["steps"] * base["batch_size"] * (base["inputs_length"] + base["targets_length"])
  lines = [f"Held-out loss after {base['steps']} steps ({tokens / 1e6:.1f}M tokens, "
           f"{tokens / dense['total_params']:.0f} per dense parameter), mean ± half-range over {base['seeds']} "
           f"seed(s); gain = dense minus the row (positive: better). Gate: the control's gain "
           f"{dense['mean'] - control['mean']:+.3f} against 3x the seed spread "
           f"{3 * noise:.3f}: **{'passed' if gate else 'failed' if gate is False else '-'}**. Steps to dense: the "
           "step at which the row's held-out loss reaches the dense model's final mean (interpolated between "
           "evaluations); speed-up = steps of dense / steps of the row.", "",
           "| model | params (active) | FLOPs / token | held-out loss | gain vs dense | > 2x spread | steps to dense "
           "loss | speed-up in steps | step time vs dense |", "|---|---|---|---|---|---|---|---|---|"]
  for label, row in results.items():
    steps = ", ".join("-" if s is None else f"{s:.0f}" for s in row["steps_to_dense_loss"])
    speed = common.fmt(*row["speedup_steps"]) + "x" if row["speedup_steps"] else "-"
    clear = "-" if row["clear"] is None or label == "dense" else ("yes" if row["clear"] else "no")
    lines.append(f"| {label} | {common.model_stats.format_count(row['total_params'])} "
                 f"({common.model_stats.format_count(row['active_params'])}) | "
                 f"{common.model_stats.format_count(row['flops_per_token'])} | "
                 f"{common.fmt(row['mean'], row['spread'])} | "
                 f"{row['gain']:+.3f} | {clear} | {steps} | {speed} | {row['step_time_ratio']:.2f}x |")
  name = common.result_name("lm_regime", args)
  common.plot(Path(args.out) / f"{name}.png", curves, "Causal LM, docstring corpus: dense, control, Switch (held-out)")
  payload = {"gate_passed": gate, "noise": noise, "control_gain": dense["mean"] - control["mean"], "tokens": tokens,
             "rows": [{"model": label, **row} for label, row in results.items()]}
  common.write(name, args.out, payload, "\n".join(lines), common.command_line())
  return payload


if __name__ == "__main__":
  main()

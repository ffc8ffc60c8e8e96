"""Where do parameters pay at CPU scale? The regime study behind every sparse-vs-dense result here.

    python -m experiments.regime                       # every candidate below, 3 seeds (see README for time)
    python -m experiments.regime --candidates chosen   # one candidate
    python -m experiments.regime --quick               # seconds: checks the script works

A Switch model can only beat its FLOP-matched dense twin where more feed-forward parameters help at all. Each
candidate regime trains three models on the same batches: the dense model, the control (the dense model with a
d_ff `wide` times wider: about the Switch model's parameters, at more FLOPs) and Switch-8 (FLOPs of the dense
model). The control gates the regime: it must beat the dense model by more than 3x the seed spread (the larger
half-range over seeds of the two) before the Switch row of that regime is read.

The candidates vary one lever at a time from the previous standard setting (d_model 128, Adafactor at the
paper's constant 0.01, batch 16): learning rate and schedule, model size (tokens per parameter), the corpus
(the built-in 0.46M tokens, repeated, or the ~5M-token docstring corpus), batch size, training length.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from experiments import common

DENSE = common.DENSE
D64 = ["ModelConfig.d_model=64", "ModelConfig.num_heads=4", "ModelConfig.head_dim=16", "ModelConfig.d_ff=256"]


def adafactor(lr: float, schedule: str = "warmup_cosine", warmup: int = 50, end: float = 0.05) -> list[str]:
  return ["TrainConfig.optimizer='adafactor'", f"TrainConfig.learning_rate={lr}", f"TrainConfig.schedule='{schedule}'",
          f"TrainConfig.warmup_steps={warmup if schedule != 'constant' else 0}",
          f"TrainConfig.end_learning_rate_fraction={end if schedule != 'constant' else 0.0}"]


# name -> (what changes, settings). d_ff is the dense model's (the control multiplies it by `wide`).
CANDIDATES = {
    "paper_lr_d128": ("d_model 128, Adafactor constant 0.01 (the paper's), batch 32, 600 steps, built-in corpus",
                      dict(extra=[], d_ff=512, steps=600, batch_size=32, corpus="builtin", eval_every=150)),
    "paper_lr_d64": ("d_model 64: 2.7x fewer parameters, 1,500 steps (14 tokens per dense parameter)",
                     dict(extra=D64, d_ff=256, steps=1500, batch_size=32, corpus="builtin", eval_every=300)),
    "tuned_lr_d64": ("Adafactor 0.05, warm-up 50, cosine to 5% (the best of 0.01-0.08 for the dense model), 800 steps",
                     dict(extra=D64 + adafactor(0.05), d_ff=256, steps=800, batch_size=32, corpus="builtin",
                          eval_every=200)),
    "docstrings": ("the docstring corpus instead of the built-in one (no repetition, a 100k-token held-out set)",
                   dict(extra=D64 + adafactor(0.05), d_ff=256, steps=800, batch_size=32, corpus="docstrings",
                        eval_every=200)),
    "narrow_ffn_docstrings": ("d_ff 64 (the FFN a bottleneck: its 8x control gained most in single-seed probes), "
                              "the docstring corpus, batch 64 (1,024 tokens per expert and step), 1,200 steps "
                              "(~31 tokens per dense parameter, ~1.8 passes over the corpus)",
                              dict(extra=[*D64[:3], "ModelConfig.d_ff=64", *adafactor(0.05)], d_ff=64, steps=1200, batch_size=64,
                                   corpus="docstrings", eval_every=300)),
    "narrow_ffn_docstrings_2400": ("the same for 2,400 steps (~62 tokens per dense parameter, ~3.6 passes): long "
                                   "enough, we hoped, for every seed to cross the loss drop that made the "
                                   "1,200-step spread",
                                   dict(extra=[*D64[:3], "ModelConfig.d_ff=64", *adafactor(0.05)], d_ff=64,
                                        steps=2400, batch_size=64, corpus="docstrings", eval_every=300)),
}
QUICK = dict(extra=[], d_ff=32, steps=4, batch_size=4, corpus="builtin", eval_every=2)


def parser():
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--candidates", default=tuple(CANDIDATES), type=lambda s: tuple(s.split(",")),
                 help=f"comma-separated candidate regimes (default: all of {', '.join(CANDIDATES)})")
  p.add_argument("--wide", type=int, default=8, help="the control's d_ff multiple (default 8: Switch-8's parameters "
                 "when every FFN is sparse)")
  p.add_argument("--experts", type=int, default=8, help="the Switch model's experts")
  p.add_argument("--layout", default="all", help="the Switch model's sparse layers: 'all' (default) or 'every:N' "
                 "(the paper's every other layer: every:2); the control stays the dense model x --wide")
  p.add_argument("--switch_gin", action="append", default=[], help="a gin binding for the Switch model only "
                 "(repeatable), e.g. MoeConfig.routed_scaling_factor=8.0; the dense and control runs stay cached")
  p.set_defaults(seeds=3)
  return p


def switch_label(args, with_gin: bool = True) -> str:
  label = f"switch-{args.experts}" + ("" if args.layout == "all" else f" ({args.layout})")
  if with_gin and args.switch_gin:
    label += " [" + ", ".join(b.split(".", 1)[-1] for b in args.switch_gin) + "]"
  return label


def candidate_base(settings: dict, args) -> dict:
  """The common.run settings of one candidate (its corpus, length, batch and bindings)."""
  base = dict(common.FULL, preset="models/switch_cpu", steps=settings["steps"], batch_size=settings["batch_size"],
              eval_every=settings["eval_every"], seeds=args.seeds,
              extra=[*settings["extra"], "TrainConfig.eval_batches=20", *args.gin])
  if settings["corpus"] == "docstrings":
    from experiments import corpus
    path = corpus.build(Path(args.work_dir) / "docstrings.jsonl")
    base["extra"] += ["DataConfig.source='text'", f"DataConfig.paths=('{path}',)"]
  return base


def main(argv=None) -> dict:
  args = parser().parse_args(argv)
  if args.quick:
    todo = {"quick": ("the quick mode's tiny model", QUICK)}
  else:
    unknown = [c for c in args.candidates if c not in CANDIDATES]
    if unknown:
      raise SystemExit(f"unknown candidate(s) {unknown}; choose from {', '.join(CANDIDATES)}.")
    todo = {c: CANDIDATES[c] for c in args.candidates}
  rows, curves = [], {}
  for name, (what, settings) in todo.items():
    base = dict(common.QUICK, seeds=1) if args.quick else candidate_base(settings, args)
    d_ff = common.model_config(base).d_ff
    models = {"dense": DENSE, f"dense, d_ff x{args.wide}": [*DENSE, f"ModelConfig.d_ff={args.wide * d_ff}"],
              switch_label(args): [*common.all_sparse(args.experts), f"ModelConfig.encoder_sparse='{args.layout}'",
                                   f"ModelConfig.decoder_sparse='{args.layout}'", *args.switch_gin]}
    results = {}
    for label, overrides in models.items():
      is_switch = label == switch_label(args)
      run_name = (switch_label(args, with_gin=False) if is_switch else label).replace(", ", "-").replace(
          " (", "-").replace(")", "").replace(":", "").replace(" ", "")
      if is_switch and args.switch_gin:   # its own directory beside the plain Switch runs
        run_name += "-" + (args.tag or common.run_key([args.switch_gin]))
      runs = [common.run(f"{name}-{run_name}", overrides, seed, base, args.work_dir)
              for seed in range(base["seeds"])]
      mean, spread = common.mean_spread([r["final_eval_loss"] for r in runs])
      results[label] = {"mean": mean, "spread": spread, "per_seed": [r["final_eval_loss"] for r in runs],
                        "params": runs[0]["total_params"], "runs": runs}
      curves[f"{name}: {label}"] = [r["eval_curve"] for r in runs]
    dense, control, switch = results.values()
    noise = max(dense["spread"], control["spread"])
    gate = dense["mean"] - control["mean"] > 3 * noise if base["seeds"] > 1 else None
    tokens = base["steps"] * base["batch_size"] * (base["inputs_length"] + base["targets_length"])
    rows.append({"candidate": name, "what": what, "tokens": tokens, "tokens_per_dense_param": tokens / dense["params"],
                 "models": results, "control_gain": dense["mean"] - control["mean"], "noise": noise,
                 "gate_passed": gate, "switch_gain": dense["mean"] - switch["mean"]})
  lines = [f"Held-out loss at the end of training, mean ± half-range over {args.seeds if not args.quick else 1} "
           "seed(s). Gain = dense minus the row's model (positive: better than dense). Gate: the control's gain "
           "exceeds 3x the seed spread (the larger half-range of dense and control).", "",
           "| candidate | tokens (per dense param) | dense | control: d_ff x{w} | control gain | gate | "
           "{s} | switch gain |".format(w=args.wide, s=switch_label(args)), "|---|---|---|---|---|---|---|---|"]
  for row in rows:
    dense, control, switch = row["models"].values()
    gate = "-" if row["gate_passed"] is None else ("passed" if row["gate_passed"] else
                                                   f"failed (3x spread {3 * row['noise']:.3f})")
    switch_cell = f"{row['switch_gain']:+.3f}" if row["gate_passed"] is not False else \
        f"({row['switch_gain']:+.3f}, not read)"
    lines.append(f"| {row['candidate']} | {row['tokens'] / 1e6:.1f}M ({row['tokens_per_dense_param']:.0f}) | "
                 f"{common.fmt(dense['mean'], dense['spread'])} | {common.fmt(control['mean'], control['spread'])} | "
                 f"{row['control_gain']:+.3f} | {gate} | {common.fmt(switch['mean'], switch['spread'])} | "
                 f"{switch_cell} |")
  lines += ["", "Candidates:", ""] + [f"- `{row['candidate']}`: {row['what']}" for row in rows]
  name = common.result_name("regime", args)
  common.plot(Path(args.out) / f"{name}.png", curves, "Held-out loss per candidate regime: dense, control, Switch")
  common.write(name, args.out, {"rows": rows, "wide": args.wide, "experts": args.experts}, "\n".join(lines),
               common.command_line())
  return {"rows": rows}


if __name__ == "__main__":
  main()

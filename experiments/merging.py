"""How few experts can serve a trained Switch model? Held-out loss and decoding speed against merged experts E'.

    python -m experiments.merging            # the regime study's Switch-8 models, 3 seeds (see serving.py)
    python -m experiments.merging --quick    # seconds: checks the script works

Each trained model's 8 experts are merged into E' = 8, 6, 4, 2, 1 (switchx/merge.py: grouped by the cosine
similarity of their weights, each group replaced by its usage-weighted average, usage = each expert's share of
the calibration tokens' choices; the router keeps its columns). E' = 8 is the identity (a check: its loss is the
model's). Beside it, the dense model of the same regime (regime.py's runs) says where merging stops paying: a
merged model worse than dense serves fewer parameters no better than dense.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments import common, regime, serving
from switchx.merge import merge_experts, similar_experts
from switchx.train.step import model_inputs

CALIBRATION_BATCHES = 4


def expert_usage(trained, batches) -> np.ndarray:
  """Each expert's share of the tokens' choices [E], averaged over the MoE layers and calibration batches."""
  import jax
  import jax.numpy as jnp
  from switchx.models.encoder_decoder import EncoderDecoder
  model = EncoderDecoder(trained.config.replace(dropout_rate=0.0))
  apply = jax.jit(lambda p, b: model.apply({"params": p}, **b)[1])
  usages = []
  for batch in batches:
    aux = apply(trained.params, {k: jnp.asarray(v) for k, v in batch.items()})
    usages += [np.asarray(layer["expert_usage"]) for layer in aux.values()]
  return np.mean(usages, axis=0)


def main(argv=None) -> dict:
  p = serving.parser(__doc__.splitlines()[0])
  args = p.parse_args(argv)
  rows = {}
  models = serving.trained_models(args)
  for trained in models:
    experts = trained.config.moe.num_experts
    counts = sorted({experts, *(e for e in (6, 4, 2, 1) if e < experts)}, reverse=True)
    usage = expert_usage(trained, [model_inputs(next(trained.train_batches)) for _ in range(CALIBRATION_BATCHES)])
    encoder_tokens = trained.held_out[0]["encoder_input_tokens"][:args.decode_rows]
    for count in counts:
      groups = similar_experts(trained.params, trained.config, count)
      config, params = merge_experts(trained.config, trained.params, groups, usage)
      row = {"seed": trained.seed, "experts": count, "groups": groups,
             "loss": serving.held_out_loss(config, params, trained.held_out),
             "expert_params": serving.expert_params(params), "file_bytes": serving.saved_size(config, params),
             "decode_tokens_per_s": serving.decode_speed(config, params, encoder_tokens)}
      rows.setdefault(count, []).append(row)
      print(f"  seed {trained.seed} E'={count}: loss {row['loss']:.4f}, groups {groups}, "
            f"{row['decode_tokens_per_s']:.0f} tokens/s", flush=True)
  dense = None if args.quick else _dense_losses(args)
  return report(rows, dense, [m.summary for m in models], args)


def _dense_losses(args) -> list[float]:
  """The regime's dense model on the same candidate (its cached runs): the line merging must stay under."""
  regime_args = regime.parser().parse_args(["--work_dir", args.work_dir, *[f"--gin={g}" for g in args.gin]])
  base = regime.candidate_base(regime.CANDIDATES[serving.CANDIDATE][1], regime_args)
  return [common.run(f"{serving.CANDIDATE}-dense", regime.DENSE, seed, base, args.work_dir)["final_eval_loss"]
          for seed in range(args.seeds)]


def report(rows: dict, dense: list[float] | None, trained: list[dict], args) -> dict:
  full = rows[max(rows)]
  lines = ["| experts served (E') | expert params | model file (MiB) | held-out loss | change vs E = "
           f"{max(rows)} | decode tokens/s (x E = {max(rows)}) |", "|---|---|---|---|---|---|"]
  summary = {}
  for count, runs in rows.items():
    loss, spread = serving.mean_spread(r["loss"] for r in runs)
    delta, delta_spread = serving.mean_spread(r["loss"] - f["loss"] for r, f in zip(runs, full))
    speed, _ = serving.mean_spread(r["decode_tokens_per_s"] / f["decode_tokens_per_s"] for r, f in zip(runs, full))
    summary[count] = {"loss": loss, "spread": spread, "delta": delta, "delta_spread": delta_spread,
                      "speed_ratio": speed, "expert_params": runs[0]["expert_params"],
                      "file_mib": runs[0]["file_bytes"] / 2**20, "runs": runs}
    lines.append(f"| {count} | {runs[0]['expert_params']:,} | {runs[0]['file_bytes'] / 2**20:.2f} | "
                 f"{common.fmt(loss, spread)} | {delta:+.4f} ± {delta_spread:.4f} | {speed:.2f} |")
  seeds = len(full)
  markdown = (f"Expert merging of the trained Switch models ({seeds} seed{'s' * (seeds > 1)}; ± half the range over "
              "seeds; changes taken per seed on the same held-out batches).")
  payload = {"rows": summary, "models": trained}
  if dense:
    dense_mean, dense_spread = common.mean_spread(dense)
    payload["dense"] = {"loss": dense_mean, "spread": dense_spread, "per_seed": dense}
    markdown += f" The dense model of the same regime: {common.fmt(dense_mean, dense_spread)}."
  markdown += "\n\n" + "\n".join(lines)
  name = common.result_name("merging", args)
  common.write(name, args.out, payload, markdown, common.command_line())
  _plot(Path(args.out) / f"{name}.png", summary, payload.get("dense"))
  return payload


def _plot(path: Path, summary: dict, dense: dict | None) -> None:
  fig, ax = serving.axes()
  counts = sorted(summary)
  ax.errorbar(counts, [summary[c]["loss"] for c in counts], yerr=[summary[c]["spread"] for c in counts], marker="o",
              capsize=3, label="Switch, experts merged")
  if dense:
    ax.axhline(dense["loss"], color="gray", linestyle="--", label="dense model (same regime)")
    ax.axhspan(dense["loss"] - dense["spread"], dense["loss"] + dense["spread"], color="gray", alpha=0.15)
  serving.save_plot(fig, ax, path, "experts served (E')", "held-out loss", "Merging a trained Switch model's experts")


if __name__ == "__main__":
  main()

"""`switchx demo`: a tiny Switch model against its FLOP-matched dense twin on the built-in corpus, over seeds.

Runs in a few minutes on a 2-core laptop with nothing downloaded, through the real training path
(`switchx train`): builds the corpus (Python's own reference manual and docstrings), trains a SentencePiece
vocabulary on it, packs it into causal-LM rows, and trains, for each seed and on the same batches, the small
causal language model of the sparse-vs-dense study (configs/models/switch_lm_cpu.gin, experiments/lm_regime.py)
twice: every FFN a Switch layer of 8 experts (top-1: the dense model's FLOPs per token), and dense. It prints a
table (held-out loss, mean ± half-range over seeds), says whether Switch beats dense by more than the seed spread,
and writes a loss-curve plot and results.json. Checkpoints and metrics of each run: demo_out/<model>-seed<k>/.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from switchx import gin_config, model_stats
from switchx.train.loop import train

PRESETS = ["models/switch_lm_cpu", "runs/demo_lm"]
MODELS = {"switch-8": [], "dense": ["DecoderOnlyConfig.sparse='none'"]}


def _plot(runs: dict[str, list[dict]], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for (name, seeds), color in zip(runs.items(), ("tab:red", "tab:blue")):
    steps = [h["step"] for h in seeds[0]["eval_history"]]
    curves = [[h["cross_entropy_loss"] for h in r["eval_history"]] for r in seeds]
    ax.plot(steps, [statistics.fmean(v) for v in zip(*curves)], "o-", color=color,
            label=f"{name} held-out (mean of {len(seeds)} seeds)")
    if len(seeds) > 1:
      ax.fill_between(steps, [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)], color=color, alpha=0.2)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.set_title("switchx demo: Switch-8 vs FLOP-matched dense, built-in corpus (band: min..max over seeds)")
  ax.title.set_fontsize(9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _spread(values: list[float]) -> tuple[float, float]:
  return statistics.fmean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def run_demo(out_dir: str = "demo_out", num_steps: int | None = None, seeds: int = 2, seed: int = 0) -> dict:
  """Trains MODELS for `seeds` seeds (seed, seed + 1, ...) -> the summary written to results.json."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  runs: dict[str, list[dict]] = {name: [] for name in MODELS}
  for k in range(seed, seed + seeds):
    for name, bindings in MODELS.items():
      steps = [f"TrainConfig.num_train_steps={num_steps}"] if num_steps else []
      gin_config.parse(PRESETS, [*bindings, *steps, f"TrainConfig.seed={k}"])
      model, train_cfg = gin_config.model_config(), gin_config.train_config()
      counts = model_stats.param_counts(model)
      if k == seed:
        flops = model_stats.flops_per_token(model, train_cfg.inputs_length, train_cfg.targets_length)
        print(f"\n{name}: {model_stats.format_count(counts['total_params'])} parameters, "
              f"{model_stats.format_count(counts['active_params'])} active per token, "
              f"{model_stats.format_count(flops)} FLOPs per token")
        for kind, n in model_stats.module_table(model):
          print(f"  {kind:<20s} {n:>10,d}")
      model_dir = out / f"{name}-seed{k}"
      shutil.rmtree(model_dir, ignore_errors=True)  # the demo always starts fresh
      summary = train(model, train_cfg, gin_config.data_config(), model_dir=model_dir,
                      operative_config=gin_config.operative_config(), name=f"{name} seed {k}")
      runs[name].append({**summary, **counts, "seed": k})

  table = {}
  for name, seeds_run in runs.items():
    mean, spread = _spread([r["eval_loss"] for r in seeds_run])
    table[name] = {"held_out": [r["eval_loss"] for r in seeds_run], "mean": mean, "spread": spread,
                   "total_params": seeds_run[0]["total_params"], "active_params": seeds_run[0]["active_params"],
                   "tokens_per_s": statistics.fmean(r["tokens_per_s"] or 0 for r in seeds_run),
                   "dropped_fraction": seeds_run[0]["dropped_fraction"]}
  switch, dense = table["switch-8"], table["dense"]
  gap, noise = dense["mean"] - switch["mean"], max(switch["spread"], dense["spread"])
  wins = [d["eval_loss"] - s["eval_loss"] for s, d in zip(runs["switch-8"], runs["dense"])]
  result = {"models": table, "gap": gap, "spread": noise, "switch_wins_every_seed": all(w > 0 for w in wins),
            "switch_beats_dense_by_more_than_spread": gap > noise and len(wins) > 1,
            "per_seed_gap": wins, "steps": runs["dense"][0]["final_step"], "runs": runs,
            "seconds": time.perf_counter() - t0}
  _plot(runs, out / "loss_curves.png")
  (out / "results.json").write_text(json.dumps(result, indent=1))
  print(f"\n{'model':<10s} {'params':>8s} {'active':>8s} {'held-out (mean ± half-range)':>30s} {'per seed':>22s} "
        f"{'tokens/s':>9s} {'dropped':>8s}")
  for name, row in table.items():
    dropped = "-" if row["dropped_fraction"] is None else f"{100 * row['dropped_fraction']:.1f}%"
    per_seed = " ".join(f"{v:.3f}" for v in row["held_out"])
    print(f"{name:<10s} {model_stats.format_count(row['total_params']):>8s} "
          f"{model_stats.format_count(row['active_params']):>8s} {row['mean']:>22.3f} ± {row['spread']:.3f} "
          f"{per_seed:>22s} {row['tokens_per_s']:>9,.0f} {dropped:>8s}")
  verdict = "yes" if result["switch_beats_dense_by_more_than_spread"] else "no"
  print(f"\nSwitch-8 - dense: {-gap:+.3f} nats (per seed: {', '.join(f'{-w:+.3f}' for w in wins)}); seed spread "
        f"{noise:.3f}; Switch beats dense by more than the spread: {verdict}")
  print(f"loss curves: {out / 'loss_curves.png'}   numbers: {out / 'results.json'}   runs: {out}/<model>-seed<k>/ "
        f"(metrics.jsonl, TensorBoard, checkpoints)   total time {time.perf_counter() - t0:.0f}s")
  return result

"""What every experiment shares: train one configuration (through the real trainer), collect its curves, and
write tables (Markdown + JSON) and plots (PNG) under experiments/results/.

A run is (name, gin presets, gin overrides, seed). Full runs use the CPU-sized presets below; --quick swaps in
a model small enough to compile in seconds and a handful of steps, so tests keep every script working.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from switchx import gin_config, model_stats
from switchx.train.loop import train

RESULTS = Path(__file__).resolve().parent / "results"

# Full runs: the model family every experiment varies (configs/models/switch_cpu.gin), pretraining on the built-in
# corpus with the demo's data settings. Quick runs: a model that compiles in seconds, a few steps.
FULL = dict(preset="models/switch_cpu", steps=1000, eval_every=200, batch_size=16, inputs_length=128,
            targets_length=32)
QUICK = dict(preset="models/switch_cpu", steps=4, eval_every=2, batch_size=4, inputs_length=32, targets_length=8,
             extra=["ModelConfig.d_model=16", "ModelConfig.num_heads=2", "ModelConfig.head_dim=8",
                    "ModelConfig.d_ff=32", "ModelConfig.num_encoder_layers=1", "ModelConfig.num_decoder_layers=1",
                    "DataConfig.tokenizer_vocab_size=256", "ModelConfig.vocab_size=356", "MoeConfig.group_size=64",
                    "TrainConfig.eval_batches=1"])


# The two model families every comparison trains (on top of the preset): dense FFNs, or every FFN sparse.
DENSE = ["ModelConfig.encoder_sparse='none'", "ModelConfig.decoder_sparse='none'"]


def all_sparse(experts: int) -> list[str]:
  return ["ModelConfig.encoder_sparse='all'", "ModelConfig.decoder_sparse='all'", f"MoeConfig.num_experts={experts}"]


def parser(description: str, experts: tuple[int, ...] | None = None) -> argparse.ArgumentParser:
  """The options every script takes; `experts` (the script's default expert counts, 0 = dense) adds --experts."""
  p = argparse.ArgumentParser(description=description)
  if experts is not None:
    p.add_argument("--experts", default=experts, type=lambda s: tuple(int(e) for e in s.split(",")),
                   help=f"comma-separated expert counts to run (default: {','.join(map(str, experts))})")
  p.add_argument("--quick", action="store_true", help="tiny model, a few steps: checks the script works")
  p.add_argument("--seeds", type=int, default=2, help="seeds per configuration (full runs)")
  p.add_argument("--steps", type=int, default=0, help="override the number of training steps")
  p.add_argument("--out", default=str(RESULTS), help="where tables, JSON and plots go")
  p.add_argument("--work_dir", default="/tmp/switchx_experiments", help="scratch run directories")
  p.add_argument("--gin", action="append", default=[], metavar="BINDING",
                 help="an extra gin binding for every run, e.g. --gin ModelConfig.num_encoder_layers=12 (repeatable)")
  p.add_argument("--at_steps", default=(), type=lambda s: tuple(int(x) for x in s.split(",")),
                 help="comma-separated steps at which tables also report the held-out loss (e.g. 1000,2800)")
  p.add_argument("--tag", default="", help="suffix of the result files (e.g. 10k: expert_count_10k.md), so a "
                 "longer variant of an experiment is written beside the standard one")
  p.add_argument("--corpus", choices=("docstrings", "builtin"), default="docstrings",
                 help="full runs: the ~15 MB package-docstring corpus (one epoch; experiments/corpus.py) or the "
                      "built-in 0.46M-token corpus (several epochs)")
  return p


def setting(args) -> dict:
  base = dict(QUICK if args.quick else FULL)
  if args.steps:
    base["steps"] = args.steps
  base["seeds"] = 1 if args.quick else args.seeds
  if args.gin:
    base["extra"] = [*base.get("extra", []), *args.gin]
  if not args.quick and args.corpus == "docstrings":
    from experiments import corpus
    path = corpus.build(Path(args.work_dir) / "docstrings.jsonl")
    base["extra"] = [*base.get("extra", []), "DataConfig.source='text'", f"DataConfig.paths=('{path}',)"]
    base["corpus_versions"] = json.loads(path.with_suffix(".versions.json").read_text())
  return base


def model_config(base: dict):
  """The ModelConfig every run of `base` starts from (its preset and extra bindings)."""
  gin_config.parse([base["preset"], "runs/demo"], base.get("extra", []))
  return gin_config.model_config()


def run(name: str, overrides: list[str], seed: int, base: dict, work_dir: str, trainer=None,
        keep_model: bool = False, key_extra: dict | None = None) -> dict:
  """Trains one configuration from scratch and returns its summary (curves, final losses, speed).

  trainer(model_config, train_config, data_config, model_dir) replaces train.loop.train (e.g. upcycling or
  distillation from another run; `key_extra` then names that run in the cache key). keep_model keeps the run's
  checkpoints (another run starts from them); otherwise only metrics.jsonl is kept."""
  bindings = [f"TrainConfig.num_train_steps={base['steps']}", f"TrainConfig.eval_every={base['eval_every']}",
              f"TrainConfig.checkpoint_every={base['steps']}", f"TrainConfig.seed={seed}",
              f"TrainConfig.batch_size={base['batch_size']}", f"TrainConfig.inputs_length={base['inputs_length']}",
              f"TrainConfig.targets_length={base['targets_length']}", "TrainConfig.log_every=25",
              *base.get("extra", []), *overrides]
  gin_config.parse([base["preset"], "runs/demo"], bindings)
  model, train_cfg = gin_config.model_config(), gin_config.train_config()
  configs = [model, train_cfg, gin_config.data_config()]
  cached = Path(work_dir) / "results" / f"{run_key(configs + ([key_extra] if key_extra else []))}.json"
  legacy = Path(work_dir) / "results" / (hashlib.sha256(json.dumps([base["preset"], bindings]).encode())
                                         .hexdigest()[:16] + ".json")   # runs cached before keys were resolved
  if not cached.exists() and legacy.exists():
    shutil.copy(legacy, cached)
  model_dir = Path(work_dir) / f"{name}-seed{seed}"
  if cached.exists() and keep_model and not (model_dir / "checkpoints").is_dir():
    cached.unlink()                         # its checkpoints are needed and were dropped: train it again
  if cached.exists():  # the same run made by another script (e.g. sparse_vs_dense reuses expert_count's runs)
    result = json.loads(cached.read_text())
    metrics = model_dir / "metrics.jsonl"
    if "router_confidence_curve" not in result and metrics.exists():  # a run recorded before the fields
      result["router_confidence"] = router_confidence(metrics)
      result["router_confidence_curve"] = router_confidence_curves(metrics)
      cached.write_text(json.dumps(result))
    print(f"  {name} seed {seed}: held-out loss {result['final_eval_loss']:.4f} (cached)", flush=True)
    result.setdefault("model_dir", str(model_dir))   # where its metrics.jsonl is (runs cached before: this name's)
    return result
  shutil.rmtree(model_dir, ignore_errors=True)
  started = time.perf_counter()
  if trainer is None:
    summary = train(model, train_cfg, gin_config.data_config(), model_dir=model_dir, show_progress=False,
                    name=f"{name} seed {seed}")
  else:
    summary = trainer(model, train_cfg, gin_config.data_config(), model_dir)
  if summary["interrupted"]:  # nothing is cached, so rerunning the script trains this run again
    raise SystemExit(f"{name} seed {seed}: {summary['interrupted']} at step {summary['final_step']} of "
                     f"{base['steps']}; no result was recorded for this run (rerun the script to train it).")
  counts = model_stats.param_counts(model)
  result = {"name": name, "seed": seed, "overrides": overrides, "steps": base["steps"],
            "final_eval_loss": summary["eval_loss"], "final_train_loss": summary["train_loss"],
            "tokens_per_s": summary["tokens_per_s"], "dropped_fraction": summary["dropped_fraction"],
            "eval_curve": [(h["step"], h["cross_entropy_loss"]) for h in summary["eval_history"]],
            "train_curve": [(h["step"], h["cross_entropy_loss"]) for h in summary["history"]],
            "step_time_s": None if not summary["tokens_per_s"] else
            base["batch_size"] * (base["inputs_length"] + base["targets_length"]) / summary["tokens_per_s"],
            "wall_s": time.perf_counter() - started,
            "flops_per_token": model_stats.flops_per_token(model, base["inputs_length"], base["targets_length"]),
            "router_confidence": router_confidence(model_dir / "metrics.jsonl"),
            "router_confidence_curve": router_confidence_curves(model_dir / "metrics.jsonl"), **counts}
  print(f"  {name} seed {seed}: held-out loss {result['final_eval_loss']:.4f}  "
        f"({result['wall_s']:.0f}s, {result['tokens_per_s'] or 0:,.0f} tokens/s)", flush=True)
  result["model_dir"] = str(model_dir)
  cached.parent.mkdir(parents=True, exist_ok=True)
  cached.write_text(json.dumps(result))
  if not keep_model:
    shutil.rmtree(model_dir / "checkpoints", ignore_errors=True)  # keep metrics.jsonl, drop the bulky state
  return result


def run_key(configs: list) -> str:
  """The run cache's key: a hash of the resolved configurations (frozen dataclasses), so bindings that differ in
  order or that override one another (a dense twin under a --gin layout) find the same run. Only fields that
  differ from their defaults enter it, so a new config field whose default keeps the old behaviour does not
  invalidate the cache. A plain dict among them (what a run starts from) enters as it is."""
  text = json.dumps([changed_fields(c) if dataclasses.is_dataclass(c) else c for c in configs], sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_fields(config) -> dict:
  """{field: repr(value)} of a frozen dataclass config's fields that differ from their defaults; nested configs
  as nested dicts (omitted when nothing in them changed)."""
  changed = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      if inner := changed_fields(value):
        changed[field.name] = inner
      continue
    if field.default is not dataclasses.MISSING:
      default = field.default
    elif field.default_factory is not dataclasses.MISSING:
      default = field.default_factory()
    else:
      default = dataclasses.MISSING
    if default is dataclasses.MISSING or value != default:
      changed[field.name] = repr(value)
  return changed


def router_confidence_curves(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
  """{sparse layer: [(step, router confidence)]} over every logged training step: how fast (and whether) the
  routers specialise. Empty for a dense model."""
  curves: dict[str, list[tuple[int, float]]] = {}
  for line in metrics_file.read_text().splitlines():
    record = json.loads(line)
    for key, value in record.items():
      if key.startswith("router/") and key.endswith("/router_confidence"):
        layer = key.removeprefix("router/").removesuffix("/router_confidence")
        curves.setdefault(layer, []).append((record["step"], value))
  return curves


def router_confidence(metrics_file: Path) -> dict[str, float]:
  """{sparse layer: its router confidence (mean top-1 router probability over real tokens)} at the last logged
  training step of a run; 1/E would be a router that has not specialised at all. Empty for a dense model."""
  last = {}
  for line in metrics_file.read_text().splitlines():
    record = json.loads(line)
    if any(k.endswith("/router_confidence") for k in record):
      last = record
  return {k.removeprefix("router/").removesuffix("/router_confidence"): v for k, v in last.items()
          if k.endswith("/router_confidence") and not k.startswith("eval/")}


def steps_per_epoch(base: dict, work_dir: str, seed: int = 0) -> float:
  """Training steps in one pass over the training documents of `seed`'s split (cached in work_dir): runs longer
  than this repeat data, which the paper's runs never do."""
  bindings = [f"TrainConfig.batch_size={base['batch_size']}", f"TrainConfig.inputs_length={base['inputs_length']}",
              f"TrainConfig.targets_length={base['targets_length']}", f"TrainConfig.seed={seed}",
              *base.get("extra", [])]
  key = hashlib.sha256(json.dumps([base["preset"], bindings]).encode()).hexdigest()[:16]
  cached = Path(work_dir) / "results" / f"epoch-{key}.json"
  if cached.exists():
    return json.loads(cached.read_text())["steps_per_epoch"]
  from switchx.train.loop import load_data
  gin_config.parse([base["preset"], "runs/demo"], bindings)
  _, pipeline, _ = load_data(gin_config.data_config(), gin_config.train_config())
  steps = pipeline.examples_per_epoch / base["batch_size"]   # one example per row: chunks fill inputs_length
  cached.parent.mkdir(parents=True, exist_ok=True)
  cached.write_text(json.dumps({"steps_per_epoch": steps}))
  return steps


def loss_at(curve: list[tuple[int, float]], step: int) -> float | None:
  """An eval curve's loss at `step` (linear between evaluations), None outside the curve."""
  for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
    if s0 <= step <= s1:
      return l0 + (l1 - l0) * (step - s0) / max(s1 - s0, 1)
  return curve[0][1] if curve and curve[0][0] == step else None


def mean_loss_at(runs: list[dict], step: int) -> tuple[float, float]:
  """(mean, spread) over seeds of the held-out loss at `step`."""
  losses = [loss_at(r["eval_curve"], step) for r in runs]
  if None in losses:
    raise SystemExit(f"--at_steps {step}: outside the runs' evaluations (steps "
                     f"{runs[0]['eval_curve'][0][0]}..{runs[0]['eval_curve'][-1][0]}).")
  return mean_spread(losses)


def mean_spread(values: list[float]) -> tuple[float, float]:
  """Mean and half the range (a spread that is honest with 2-3 seeds)."""
  return statistics.fmean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
  """First step at which an eval curve reaches `target` (linear interpolation between evals), or None."""
  previous = None
  for step, loss in curve:
    if loss <= target:
      if previous is None:
        return float(step)
      (s0, l0) = previous
      return s0 + (step - s0) * (l0 - target) / max(l0 - loss, 1e-12)
    previous = (step, loss)
  return None


def _runs(tree) -> dict:
  """Every run summary inside a result payload, by (name, seed)."""
  if isinstance(tree, dict):
    if "wall_s" in tree and "seed" in tree:
      return {(tree["name"], tree["seed"]): tree}
    tree = list(tree.values())
  found = {}
  for item in tree if isinstance(tree, list) else []:
    found.update(_runs(item))
  return found


def result_name(name: str, args) -> str:
  """The experiment's result file stem: `name`, or name_<tag> with --tag."""
  return f"{name}_{args.tag}" if getattr(args, "tag", "") else name


def write(name: str, out: str, payload: dict, markdown: str, command: str,
          where: str = "2-core CPU, shared with other work") -> None:
  runs = _runs(payload)
  minutes = sum(r["wall_s"] for r in runs.values()) / 60
  markdown += (f"\n\nCommand: `{command.strip()}`; {len(runs)} training runs, {minutes:.0f} min of training here "
               f"({where}; a run another script already made counts here too).")
  out_dir = Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  payload = {"command": command, **payload}
  (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
  (out_dir / f"{name}.md").write_text(f"<!-- generated by: {command} -->\n{markdown}\n")
  print(markdown)


def command_line() -> str:
  """The command that ran, quoted so it can be pasted into a shell (--gin values carry quotes)."""
  def quote(arg: str) -> str:
    if not any(c in arg for c in "\"$`\\") and shlex.quote(arg) != arg:
      return f'"{arg}"'                                   # e.g. "ModelConfig.encoder_sparse='every:2'"
    return shlex.quote(arg)
  return "python -m experiments." + Path(sys.argv[0]).stem + " " + " ".join(map(quote, sys.argv[1:]))


def plot(path: Path, series: dict[str, list[list[tuple[int, float]]]], title: str, ylabel: str = "held-out loss",
         epoch_steps: float | None = None):
  """One line per series: the mean over seeds of eval curves, with a band for min..max; dashed lines where a
  new pass over the training text begins (every `epoch_steps`)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for label, curves in series.items():
    steps = [s for s, _ in curves[0]]
    values = [[l for _, l in c] for c in curves]
    mean = [statistics.fmean(v) for v in zip(*values)]
    line, = ax.plot(steps, mean, "o-", label=label, markersize=3)
    if len(curves) > 1:
      ax.fill_between(steps, [min(v) for v in zip(*values)], [max(v) for v in zip(*values)],
                      color=line.get_color(), alpha=0.15)
  if epoch_steps:
    last = max(s for curves in series.values() for s, _ in curves[0])
    for k in range(1, int(last // epoch_steps) + 1):
      ax.axvline(k * epoch_steps, color="gray", linestyle="--", linewidth=0.8,
                 label="new pass over the text" if k == 1 else None)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def fmt(mean: float, spread: float) -> str:
  return f"{mean:.3f} ± {spread:.3f}" if spread else f"{mean:.3f}"


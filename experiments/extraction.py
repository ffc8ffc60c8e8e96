"""Task-level routing for serving: what a task's extracted sub-network costs and gives, against the full model.

    python -m experiments.extraction            # fine-tunes the regime study's Switch-8 models, 3 seeds
    python -m experiments.extraction --quick    # seconds: checks the script works

Each pretrained Switch-8 model (serving.py) is fine-tuned on a two-task mixture built offline from standard-library
docstrings, twice from the same checkpoint: routed by token (Switch) and routed by task (MoeConfig.route_by="task",
each layer's router replaced by a fresh [tasks, E] table: Kudugunta et al. 2021; no capacity limit and no balance
loss, which mean nothing when all of a task's tokens take the same expert). Then, per task: held-out loss and
exact match of the token-routed model (the reference: what task routing gives up), of the task-routed model, and
of the task's extracted sub-network (`switchx extract`: its top-1 expert per layer, a model of its own), with the
expert parameters each serves and greedy decoding tokens/s; every model is scored without dropping tokens.

Tasks: "module" (which of 8 standard-library modules a docstring's first 24 words come from; chance 1/8) and
"continue" (the next 4 words after a docstring's first 20).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from experiments import common, serving
from switchx.config import DecodeConfig, FinetuneConfig, TaskConfig
from switchx.data.tasks import docstring_task, load_task, validation_batches
from switchx.decode import generate, output_ids
from switchx.extract import extract_task, task_usage
from switchx.train import restore
from switchx.train.finetune import finetune, finetune_train_config

FULL = dict(steps=400, batch_size=32, inputs_length=64, targets_length=8, learning_rate=5e-3, eval_examples=160)
QUICK = dict(steps=3, batch_size=4, inputs_length=32, targets_length=8, learning_rate=1e-2, eval_examples=8)


def write_tasks(directory: Path) -> tuple[TaskConfig, ...]:
  """The two tasks' JSON-lines files (deterministic: the standard library's docstrings, seed 0)."""
  source = docstring_task(num_classes=8, max_words=24, per_class=200, prefix="module: ")
  words = docstring_task(num_classes=8, max_words=24, per_class=200, prefix="")
  tasks = {"module": source}
  tasks["continue"] = {split: [{"input": "continue: " + " ".join(e["input"].split()[:20]),
                                "target": " ".join(e["input"].split()[20:24])}
                               for e in words[split] if len(e["input"].split()) >= 24]
                       for split in ("train", "validation")}
  configs = []
  for name, task in tasks.items():
    for split in ("train", "validation"):
      path = directory / name / f"{split}.jsonl"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text("".join(json.dumps({"input": e["input"], "target": e["target"]}) + "\n" for e in task[split]))
    configs.append(TaskConfig(name=name, train_path=str(directory / name / "train.jsonl"),
                              validation_path=str(directory / name / "validation.jsonl")))
  return tuple(configs)


def score(config, params, batches, task_id: int | None, max_length: int) -> dict:
  """Held-out loss and exact match of greedy decodes on one task's validation batches, no token dropped (as
  decoding routes; the extracted model drops none either)."""
  config = config.replace(moe=dataclasses.replace(config.moe, eval_capacity_factor=0.0, expert_capacity=None))
  if task_id is None:          # a model that takes no task ids (token-routed, or an extracted task)
    batches = [{k: v for k, v in b.items() if not k.endswith("_task_ids")} for b in batches]
  matches = []
  for batch in batches:
    decoded = generate(config, params, batch["encoder_input_tokens"], DecodeConfig(max_decode_length=max_length),
                       task_ids=task_id).tokens
    real = batch["decoder_loss_weights"].sum(1) > 0
    for got, want, is_real in zip(output_ids(jax.device_get(decoded)), output_ids(batch["decoder_target_tokens"]),
                                  real):
      if is_real:
        matches.append(got == want)
  return {"loss": serving.held_out_loss(config, params, batches), "exact_match": float(np.mean(matches))}


def main(argv=None) -> dict:
  p = serving.parser(__doc__.splitlines()[0])
  args = p.parse_args(argv)
  s = QUICK if args.quick else FULL
  tasks = write_tasks(Path(args.work_dir) / "extraction_tasks")
  train = finetune_train_config(num_train_steps=s["steps"], batch_size=s["batch_size"],
                                inputs_length=s["inputs_length"], targets_length=s["targets_length"],
                                learning_rate=s["learning_rate"], eval_every=s["steps"], checkpoint_every=s["steps"],
                                log_every=50)
  rows = []
  models = serving.trained_models(args)
  for trained in models:
    pretrained = trained.summary["model_dir"]
    tuned = {}
    for routing in ("token", "task"):
      moe_changes = {"expert_dropout_rate": 0.0}
      if routing == "task":   # capacity and the balance loss mean nothing when a task's tokens share k experts
        moe_changes.update(route_by="task", num_tasks=len(tasks), train_capacity_factor=0.0,
                           eval_capacity_factor=0.0, load_balance_loss_coef=0.0)
      key = common.run_key([train, moe_changes, {"init_from": pretrained, "tasks": [t.name for t in tasks]}])
      model_dir = Path(args.work_dir) / f"extraction-{routing}-seed{trained.seed}-{key}"   # reruns resume it
      finetune(dataclasses.replace(train, seed=trained.seed), FinetuneConfig(
          init_from=pretrained, tasks=tasks, eval_examples=s["eval_examples"]), model_dir, show_progress=False,
          model_changes={"dropout_rate": 0.0}, moe_changes=moe_changes)
      loaded = restore.load_model(model_dir)
      tuned[routing] = (loaded.config, jax.device_get(loaded.params))
    tokenizer = restore.load_tokenizer(pretrained)
    task_config, task_params = tuned["task"]
    usage = task_usage(task_config, task_params)
    for task_id, task in enumerate(tasks):
      loaded_task = load_task(task, tokenizer, s["inputs_length"], s["targets_length"])
      batches = validation_batches(loaded_task, s["batch_size"], s["inputs_length"], s["targets_length"],
                                   s["eval_examples"], task_id)
      small_config, small_params = extract_task(task_config, task_params, task_id)
      encoder_tokens = batches[0]["encoder_input_tokens"][:args.decode_rows]
      variants = {"token-routed": (*tuned["token"], None), "task-routed": (task_config, task_params, task_id),
                  "extracted": (small_config, small_params, None)}
      row = {"seed": trained.seed, "task": task.name, "experts_used": {k: v[task_id] for k, v in usage.items()}}
      for label, (config, params, ids) in variants.items():
        row[label] = {**score(config, params, batches, ids, s["targets_length"]),
                      "expert_params": serving.expert_params(params),
                      "decode_tokens_per_s": serving.decode_speed(config, params, encoder_tokens,
                                                                  s["targets_length"], task_ids=ids)}
      rows.append(row)
      print(f"  seed {trained.seed} {task.name}: " + ", ".join(
          f"{k} loss {row[k]['loss']:.3f} EM {row[k]['exact_match']:.2f}" for k in variants), flush=True)
  return report(rows, [m.summary for m in models], args)


def report(rows: list[dict], trained: list[dict], args) -> dict:
  labels = ("token-routed", "task-routed", "extracted")
  lines = ["| task | model | expert params | held-out loss | exact match | decode tokens/s (x task-routed) |",
           "|---|---|---|---|---|---|"]
  summary = {}
  for task in dict.fromkeys(r["task"] for r in rows):
    runs = [r for r in rows if r["task"] == task]
    for label in labels:
      loss = serving.mean_spread(r[label]["loss"] for r in runs)
      match = serving.mean_spread(r[label]["exact_match"] for r in runs)
      speed = serving.mean_spread(r[label]["decode_tokens_per_s"] / r["task-routed"]["decode_tokens_per_s"]
                                  for r in runs)
      summary[f"{task}/{label}"] = {"loss": loss, "exact_match": match, "speed_ratio": speed,
                                    "expert_params": runs[0][label]["expert_params"]}
      lines.append(f"| {task} | {label} | {runs[0][label]['expert_params']:,} | {common.fmt(*loss)} | "
                   f"{common.fmt(*match)} | {speed[0]:.2f} |")
  seeds = len({r["seed"] for r in rows})
  markdown = (f"Task-level routing and extraction ({seeds} seed{'s' * (seeds > 1)} of the pretrained Switch model, "
              "each fine-tuned twice; ± half the range over seeds).\n\n" + "\n".join(lines))
  name = common.result_name("extraction", args)
  payload = {"summary": summary, "rows": rows, "models": trained}
  common.write(name, args.out, payload, markdown, common.command_line())
  _plot(Path(args.out) / f"{name}.png", summary, labels)
  return payload


def _plot(path: Path, summary: dict, labels) -> None:
  tasks = list(dict.fromkeys(k.split("/")[0] for k in summary))
  fig, ax = serving.axes()
  width = 0.8 / len(labels)
  for i, label in enumerate(labels):
    values = [summary[f"{t}/{label}"]["loss"] for t in tasks]
    ax.bar(np.arange(len(tasks)) + i * width, [v[0] for v in values], width, yerr=[v[1] for v in values], capsize=3,
           label=f"{label} ({summary[f'{tasks[0]}/{label}']['expert_params']:,} expert params)")
  ax.set_xticks(np.arange(len(tasks)) + width, tasks)
  serving.save_plot(fig, ax, path, "task", "held-out loss (validation)",
                    "Task routing: full model vs each task's extracted sub-network", legend_size=8)


if __name__ == "__main__":
  main()

"""Fine-tuning: a checkpoint, a task or a mixture of tasks, freezing options, task metrics, the best checkpoint.

    summary = finetune(train_config, FinetuneConfig(init_from="runs/pretrain", tasks=(TaskConfig(...),)),
                       model_dir="runs/topics", model_changes={"dropout_rate": 0.1})

Sections: checks that cost nothing (the tasks' files, the checkpoint's config against the given one, the
freezing option against the model) -> tokenizer and data -> mesh, state.build, the fine-tuning optimizer and
its compiled step -> restore (resume this run, or start from init_from) -> loop (metrics, periodic task eval,
latest checkpoints for resuming, the best checkpoint in model_dir/best) -> final save.

Freezing goes through the optimizer: optax.multi_transform sends the frozen parameters' gradients to
optax.set_to_zero, so their updates are exactly 0 and they stay bit-identical (and carry no optimizer state).
Task metrics on the validation split: token accuracy and negative log perplexity teacher-forced (eval capacity
factor, as the eval step runs), and exact match of greedy decodes against the targets (no-drop routing, as
switchx.decode runs; for a classification task whose target is the label, exact match is its accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np

from switchx.config import DecodeConfig, FinetuneConfig, ModelConfig, TrainConfig, check_vocab, config_from_dict
from switchx.data.packing import RowPacker
from switchx.data.tasks import Mixture, load_task, validation_batches
from switchx.decode import generate, output_ids
from switchx.extract import task_router_params
from switchx.interop.hf import import_hf
from switchx.parallel.mesh import MeshConfig, make_mesh, maybe_initialize_distributed
from switchx.parallel.partitioning import Partitioner
from switchx.train import optim, restore, state as state_lib
from switchx.train.checkpoint import Checkpointer
from switchx.train.loop import resume, run_loop
from switchx.train.metrics import MetricWriter

log = logging.getLogger("switchx")

BEST_DIR = "best"
BEST_FILE = "best.json"


def finetune_train_config(**changes) -> TrainConfig:
  """The Switch paper's fine-tuning recipe (configs/runs/finetune.gin): Adafactor at a constant 1e-3."""
  base = dict(optimizer="adafactor", learning_rate=1e-3, schedule="constant", warmup_steps=0,
              num_train_steps=10_000, batch_size=128, z_loss_coef=1e-4)
  return TrainConfig(**{**base, **changes})


# --- task metrics ------------------------------------------------------------------------------------------
TASK_METRICS = ("exact_match", "token_accuracy", "neg_log_perplexity")


def score_task(run, params, task, train_config: TrainConfig, finetune_config: FinetuneConfig,
               task_id: int = 0) -> tuple[dict, list]:
  """(metrics, predicted ids) of a task's first eval_examples validation examples, one example per row; task_id:
  its index in the mixture (what task-routed MoE layers route by)."""
  decode_config = DecodeConfig(max_decode_length=finetune_config.max_decode_length or train_config.targets_length)
  batches = validation_batches(task, train_config.batch_size, train_config.inputs_length,
                               train_config.targets_length, finetune_config.eval_examples, task_id)
  tokens = ce = correct = 0.0
  predictions, matches = [], []
  for batch in batches:
    metrics = jax.device_get(run.eval_step(params, run.shard_batch(batch)))
    n = float(metrics["num_target_tokens"])
    tokens += n
    ce += float(metrics["cross_entropy_loss"]) * n
    correct += float(metrics["accuracy"]) * n
    decoded = generate(run.config, params, batch["encoder_input_tokens"], decode_config, task_ids=task_id).tokens
    real = batch["decoder_loss_weights"].sum(1) > 0                            # rows holding an example
    for got, want, is_real in zip(output_ids(jax.device_get(decoded)), output_ids(batch["decoder_target_tokens"]),
                                  real):
      if is_real:
        predictions.append(got)
        matches.append(got == want)
  metrics = {"exact_match": float(np.mean(matches)) if matches else 0.0,
             "token_accuracy": correct / max(tokens, 1.0), "neg_log_perplexity": -ce / max(tokens, 1.0),
             "examples": len(matches)}
  return metrics, predictions


def evaluate_tasks(run, params, tasks, tokenizer, train_config: TrainConfig, finetune_config: FinetuneConfig,
                   samples: int = 3) -> dict:
  """Validation metrics per task ("<task>/exact_match", ...), their means over the tasks ("exact_match", ...),
  and a few decoded samples per task ("<task>/samples", for the log). Tasks without validation data are
  skipped."""
  results, per_task = {}, []
  for task_id, task in enumerate(tasks):
    if not task.validation:
      continue
    metrics, predictions = score_task(run, params, task, train_config, finetune_config, task_id)
    per_task.append(metrics)
    results.update({f"{task.name}/{key}": value for key, value in metrics.items()})
    results[f"{task.name}/samples"] = [
        {"input": x, "target": y, "prediction": tokenizer.decode(p)}
        for (x, y), p in zip(task.validation_texts[:samples], predictions[:samples])]
  results.update({key: float(np.mean([m[key] for m in per_task])) for key in TASK_METRICS if per_task})
  return results


# --- the run -----------------------------------------------------------------------------------------------
def read_init_config(init_from: str | Path) -> ModelConfig:
  """The ModelConfig of a run directory or saved model, from its config.json (nothing restored; a transformers
  directory is read whole, since its config alone does not say whether the output logits are tied)."""
  path = Path(init_from)
  if not path.is_dir():
    raise FileNotFoundError(f"FinetuneConfig.init_from={str(init_from)!r}: no such directory; give a `switchx "
                            "train` / `switchx finetune` directory (or its best/) or a switchx.save directory.")
  run_dir = path.parent if not (path / restore.CONFIG_FILE).is_file() else path
  if not (run_dir / restore.CONFIG_FILE).is_file():
    raise FileNotFoundError(f"{path}: no {restore.CONFIG_FILE} (neither a run directory, nor its best/, nor a "
                            "switchx.save / transformers directory).")
  fields = json.loads((run_dir / restore.CONFIG_FILE).read_text())
  if "model" in fields:
    return restore.model_config_from(fields["model"], str(run_dir / restore.CONFIG_FILE))
  if "model_type" in fields:
    return import_hf(str(run_dir))[0]
  return config_from_dict(fields, str(run_dir / restore.CONFIG_FILE))


def _to_task_routing(saved: ModelConfig, model_config: ModelConfig | None, moe_changes: dict | None) -> int:
  """The task count when a token-routed checkpoint is fine-tuned as a task-routed model (MoeConfig.route_by="task"
  in the given config or changes: extract.task_router_params converts its parameters), else 0."""
  given = model_config.moe if model_config is not None else dataclasses.replace(saved.moe, **(moe_changes or {}))
  if saved.is_sparse and saved.moe.route_by == "token" and given.route_by == "task":
    return given.num_tasks
  return 0


def finetune(train_config: TrainConfig, finetune_config: FinetuneConfig, model_dir: str | Path,
             model_config: ModelConfig | None = None, model_changes: dict | None = None,
             moe_changes: dict | None = None, mesh_config: MeshConfig = MeshConfig(), data_config=None,
             operative_config: str = "", show_progress: bool = True) -> dict:
  """Fine-tunes FinetuneConfig.init_from on its tasks; re-running the same call resumes from model_dir.

  The model is the checkpoint's config with `model_changes` / `moe_changes` applied (e.g. dropout 0.1, expert
  dropout 0.4, capacity factors), or `model_config` (which must describe the same parameters). data_config:
  its tokenizer_path names the tokenizer when the checkpoint does not (a saved model without spiece.model).
  -> a summary: final step, best metric and step, eval history, wall time.
  """
  t0 = time.perf_counter()
  fc, tc = finetune_config, train_config
  # --- 1. Checks that cost nothing ------------------------------------------------------------------------
  if not fc.init_from:
    raise ValueError("FinetuneConfig.init_from is empty: give the checkpoint to start from (a run directory, "
                     "RUN/best, or a switchx.save directory).")
  if not fc.tasks:
    raise ValueError("FinetuneConfig.tasks is empty: give at least one TaskConfig (or --task NAME=TRAIN.jsonl).")
  saved = read_init_config(fc.init_from)
  to_task_routing = _to_task_routing(saved, model_config, moe_changes)
  if to_task_routing:       # a token-routed checkpoint fine-tuned with task routing: its routers become tables
    saved = saved.replace(moe=dataclasses.replace(saved.moe, route_by="task", num_tasks=to_task_routing))
  if model_config is not None:
    restore.check_compatible(saved, model_config, f"the checkpoint in {fc.init_from}")
    config = model_config
  else:
    config = restore.apply_overrides(saved, model_changes, moe_changes)
  optim.make_optimizer(tc, fc.freeze, config)                    # a freezing option the model cannot take
  if config.moe.route_by == "task" and config.is_sparse and config.moe.num_tasks < len(fc.tasks):
    raise ValueError(f"MoeConfig.num_tasks={config.moe.num_tasks} but the mixture has {len(fc.tasks)} tasks: a "
                     "task-routed model needs a table row per task (task ids are each task's index in "
                     f"FinetuneConfig.tasks); set num_tasks={len(fc.tasks)}.")
  model_dir = Path(model_dir)
  record = {"model": dataclasses.asdict(config), "train": dataclasses.asdict(tc),
            "finetune": dataclasses.asdict(fc), "mesh": dataclasses.asdict(mesh_config)}

  # --- 2. Tokenizer and data ------------------------------------------------------------------------------
  tokenizer = restore.load_tokenizer(fc.init_from, data_config)
  check_vocab(config, tokenizer.vocab_size - 1, f"the tokenizer's ids (vocabulary {tokenizer.vocab_size})")
  tasks = [load_task(task, tokenizer, tc.inputs_length, tc.targets_length) for task in fc.tasks]
  maybe_initialize_distributed()
  process_index, process_count = jax.process_index(), jax.process_count()
  if process_count > 1:  # the task evaluation feeds whole validation batches from one host
    raise ValueError(f"fine-tuning runs in one process (this job has {process_count}); use one host's devices "
                     "through --mesh.")
  mixture = Mixture(tasks, batch_size=tc.batch_size // process_count, inputs_length=tc.inputs_length,
                    targets_length=tc.targets_length, seed=tc.seed, pack=fc.pack, process_index=process_index,
                    process_count=process_count)

  # --- 3. Mesh, run, optimizer, compiled step -------------------------------------------------------------
  partitioner = Partitioner(make_mesh(mesh_config))
  partitioner.check_batch(tc.batch_size)
  example = {k: np.zeros((tc.batch_size,) + v.shape[1:], v.dtype) for k, v in mixture_batch_shapes(tc).items()}
  run = state_lib.build(config, tc, partitioner, example, optimizer=optim.make_optimizer(tc, fc.freeze, config))
  abstract = run.abstract_state()
  rng = jax.random.PRNGKey(tc.seed + 1)
  run.compile_train_step(example, rng)               # before the state exists: compiling's memory is given back

  # --- 4. Resume this run, or start from the checkpoint ---------------------------------------------------
  model_dir.mkdir(parents=True, exist_ok=True)
  checkpoints = Checkpointer(model_dir / "checkpoints", keep=tc.keep_checkpoints)
  best_checkpoints = Checkpointer(model_dir / BEST_DIR, keep=1)
  best = json.loads((model_dir / BEST_FILE).read_text()) if (model_dir / BEST_FILE).is_file() else None
  if best is not None and best.get("metric") != fc.best_metric:
    best = None                                              # a new metric: its best starts afresh
  resumed = resume(checkpoints, abstract, record, model_dir, mixture)
  if resumed is None:
    loaded = restore.load_model(fc.init_from, partitioner)
    params = loaded.params
    if to_task_routing:
      params = task_router_params(jax.device_get(params), to_task_routing, seed=tc.seed)
      log.info("routing by task: each MoE layer's router replaced by a fresh [%d, E] table", to_task_routing)
    resumed = run.init_from_params(params), 0
    log.info("fine-tuning %s (%s)", fc.init_from, loaded.source)
  state, step = resumed
  if process_index == 0:
    (model_dir / restore.CONFIG_FILE).write_text(json.dumps(record, indent=1))
    tokenizer.save(model_dir / restore.TOKENIZER_FILE)
    if operative_config:
      (model_dir / "config.gin").write_text(operative_config)

  # --- 5. The loop (train/loop.py's), with task evaluation that keeps the best checkpoint --------------------
  latest_eval = {}                                   # {step: its eval scalars}, saved with that step's checkpoint

  def meta(step):
    return {"data": mixture.get_state(), "config": record, "eval": latest_eval.get(step, {})}

  def evaluate(step, state):
    nonlocal best
    eval_metrics = evaluate_tasks(run, state.params, tasks, tokenizer, tc, fc)
    latest_eval.clear()
    latest_eval[step] = _scalars(eval_metrics)
    value = eval_metrics.get(fc.best_metric)
    if value is not None and (best is None or value > best["value"]):
      best_checkpoints.save(step, state, meta(step))
      best = {"step": step, "metric": fc.best_metric, "value": value, "eval": _scalars(eval_metrics)}
      if process_index == 0:
        (model_dir / BEST_FILE).write_text(json.dumps(best, indent=1))
    log.info("step %d: %s", step, {k: round(v, 4) for k, v in _scalars(eval_metrics).items() if "/" not in k})
    for task in tasks:
      for sample in eval_metrics.get(f"{task.name}/samples", []):
        log.info("  %s: %r -> %r (target %r)", task.name, sample["input"][:80], sample["prediction"],
                 sample["target"])
    return _scalars(eval_metrics)

  writer = MetricWriter(model_dir, enabled=process_index == 0)
  try:
    result = run_loop(run, state, step, mixture, rng, tc, writer, name="finetune",
                      show_progress=show_progress and process_index == 0,
                      save=lambda step, state: checkpoints.save(step, state, meta(step)), evaluate=evaluate,
                      extra_metrics=lambda: {f"examples/{name}": n for name, n in mixture.task_counts().items()})
  finally:
    checkpoints.close()
    best_checkpoints.close()
    writer.close()
  step, history, eval_history, interrupted = result.step, result.history, result.eval_history, result.interrupted
  return {"model_dir": str(model_dir), "final_step": step, "interrupted": interrupted, "best": best,
          "history": history, "eval_history": eval_history,
          "final_eval": eval_history[-1] if eval_history else None,
          "tasks": {t.name: {"train": len(t.train), "validation": len(t.validation)} for t in tasks},
          "wall_s": time.perf_counter() - t0}


def mixture_batch_shapes(train_config: TrainConfig) -> dict[str, np.ndarray]:
  """A batch of one row with the fine-tuning batch's keys and lengths (shapes for state.build)."""
  return RowPacker(1, train_config.inputs_length, train_config.targets_length, with_task_ids=True).batch()


def _scalars(metrics: dict) -> dict:
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

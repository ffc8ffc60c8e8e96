"""The training loop: one function in sections, from configs to a trained, checkpointed model.

    summary = train(model_config, train_config, data_config, mesh_config, model_dir="/tmp/run")

Sections: checks that cost nothing -> processes and mesh -> data -> model, optimizer, shardings, compiled steps
-> restore or initialise -> loop (metrics, eval, checkpoints, signals, non-finite guard) -> final save.
Re-running the same command resumes from the newest usable checkpoint in model_dir and, with the data position
and RNG restored, continues exactly as an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from switchx.config import DataConfig, DecoderOnlyConfig, ModelConfig, TrainConfig, check_vocab
from switchx.data import CausalPipeline, Pipeline
from switchx.data.sources import load_documents, load_tokenizer
from switchx.parallel.mesh import MeshConfig, make_mesh, maybe_initialize_distributed
from switchx.parallel.partitioning import Partitioner
from switchx.train import state as state_lib
from switchx.train.checkpoint import Checkpointer
from switchx.train.metrics import MetricWriter, held_out_metrics, to_python

log = logging.getLogger("switchx")


class NonFiniteLossError(FloatingPointError):
  pass


def config_record(**configs) -> dict:
  """JSON-serialisable view of config dataclasses (what config.json holds); a decoder-only model's says so in
  "architecture", so that the run can be read back (restore.model_config_from)."""
  tag = lambda cfg: {"architecture": "decoder_only"} if isinstance(cfg, DecoderOnlyConfig) else {}
  return {name: {**tag(cfg), **dataclasses.asdict(cfg)} for name, cfg in configs.items()}


def load_data(data: DataConfig, train: TrainConfig, process_index: int = 0, process_count: int = 1,
              causal: bool = False):
  """-> (tokenizer, endless train Pipeline for this process, fixed list of held-out batches). causal: batches
  for a decoder-only model (CausalPipeline) instead of span corruption."""
  train_docs, eval_docs = load_documents(data)   # the split (and tokenizer) fixed by data.split_seed
  tokenizer = load_tokenizer(data, train_docs)
  pipeline = lambda docs, seed: (CausalPipeline if causal else Pipeline)(
      docs, tokenizer, batch_size=train.batch_size // process_count, inputs_length=train.inputs_length,
      targets_length=train.targets_length, seed=seed, pack=data.pack, process_index=process_index,
      process_count=process_count, noise_density=data.noise_density,
      mean_noise_span_length=data.mean_noise_span_length)
  eval_pipeline = pipeline(eval_docs, data.split_seed + 1)   # the same held-out batches for every seed
  return tokenizer, pipeline(train_docs, train.seed), [next(eval_pipeline) for _ in range(train.eval_batches)]


def evaluate(run, params, batches) -> dict:
  """Token-weighted held-out metrics, named as the training metrics are."""
  metrics = held_out_metrics(run, params, batches)
  out = {"cross_entropy_loss": -metrics["neg_log_perplexity"], "accuracy": metrics["token_accuracy"]}
  if "dropped_fraction" in metrics:
    out["router/dropped_fraction"] = metrics["dropped_fraction"]
  return out


def check_finite(step: int, metrics) -> None:
  loss = float(metrics["loss"])
  if np.isfinite(loss):
    return
  host = jax.device_get(metrics)
  lines = [f"non-finite loss {loss} at step {step}; no checkpoint of this state was written.",
           f"  cross_entropy_loss={to_python(host['cross_entropy_loss'])} grad_norm={to_python(host['grad_norm'])}"]
  for name in sorted(k for k in host if k.startswith("router/") and k.count("/") == 3):
    value = to_python(host[name])
    if not isinstance(value, list):
      flag = "   <-- not finite" if not np.isfinite(value) else ""
      lines.append(f"  {name} = {value}{flag}")
  raise NonFiniteLossError("\n".join(lines))


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]))


class StopSignals:
  """SIGTERM / SIGINT ask the loop to save a checkpoint and stop after the current step."""

  def __init__(self):
    self.requested = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class WithExtras:
  """A data pipeline whose batches get add_to_batch(batch)'s arrays too; its state is the pipeline's."""

  def __init__(self, pipeline, add_to_batch: Callable[[dict], dict]):
    self.pipeline, self.add_to_batch = pipeline, add_to_batch

  def __next__(self) -> dict:
    batch = next(self.pipeline)
    return {**batch, **self.add_to_batch(batch)}

  def get_state(self):
    return self.pipeline.get_state()

  def set_state(self, state) -> None:
    self.pipeline.set_state(state)


def with_defaults(saved, current):
  """The saved config record with the fields it lacks (added to switchx after it was written) taken as their
  defaults, so an older run still resumes: a field missing from `saved` gets its default value (from the current
  config's class), nested records (moe) alike. None when nothing was saved."""
  if not isinstance(saved, dict):
    return saved
  defaults = _default_record(current)
  out = dict(saved)
  for key, value in current.items():
    if key not in out and key in defaults:
      out[key] = defaults[key]
    elif isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = with_defaults(out[key], value)
  return out


def _default_record(current: dict) -> dict:
  """The JSON record of the default config of the class `current` records (a model config or MoeConfig)."""
  from switchx.config import MoeConfig
  keys = set(current) - {"architecture"}          # a decoder-only record's tag (config_record)
  cls = next((c for c in (ModelConfig, DecoderOnlyConfig, MoeConfig)
              if {f.name for f in dataclasses.fields(c)} == keys), None)
  return {} if cls is None else json.loads(json.dumps(config_record(model=cls())["model"]))


def resume(checkpoints: Checkpointer, abstract_state, record: dict, model_dir: Path, data):
  """(state, step) of the newest checkpoint, with `data` (a pipeline or mixture) back at its position; None
  when there is none. A checkpoint made with another ModelConfig is an error."""
  if not checkpoints.steps():
    return None
  state, meta, step = checkpoints.restore(abstract_state)
  current = json.loads(json.dumps(record["model"]))
  if with_defaults(meta.get("config", {}).get("model"), current) != current:
    raise ValueError(f"the checkpoint in {model_dir} was made with a different ModelConfig; use another "
                     "--model_dir or the original config.")
  data.set_state(meta["data"])
  log.info("resumed from step %d", step)
  return state, step


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  history: list[dict]          # the logged training metrics, one dict per log step
  eval_history: list[dict]     # what `evaluate` returned, one dict per evaluation
  interrupted: str | None      # the signal that stopped the loop early


def run_loop(run, state, step: int, data, rng, tc: TrainConfig, writer: MetricWriter, *,
             save: Callable[[int, Any], None], evaluate: Callable[[int, Any], dict],
             extra_metrics: Callable[[], dict] = dict, name: str = "train", show_progress: bool = True
             ) -> LoopResult:
  """The loop `train` and `finetune` share, from `step` to tc.num_train_steps: a train step per batch of `data`;
  every tc.log_every steps the metrics (plus extra_metrics()) to `writer` and the progress bar; every
  tc.eval_every steps and at the end evaluate(step, state) (scalars, written under eval/); every
  tc.checkpoint_every steps, at the end and on SIGTERM / SIGINT save(step, state), then stop on a signal.
  Losses are checked one step behind (so the device queue stays full), and never is a non-finite state saved."""
  progress = None
  if show_progress:
    progress = tqdm(total=tc.num_train_steps, initial=step, desc=name, unit="step", file=sys.stdout,
                    dynamic_ncols=True, mininterval=1.0)
  history, eval_history, pending, interrupted = [], [], None, None
  tokens_per_step = tc.batch_size * (tc.inputs_length + tc.targets_length)
  timed_steps, timer = 0, None
  try:
    with StopSignals() as signals:
      while step < tc.num_train_steps:
        batch = run.shard_batch(next(data))
        state, metrics = run.train_step(state, batch, rng)
        step += 1
        if pending is not None:
          check_finite(*pending)                      # one step behind, so the device queue stays full
        pending = (step, metrics)
        if timer is None:
          jax.block_until_ready(metrics)
          timer = time.perf_counter()                  # throughput excludes the first (compiling) step
        else:
          timed_steps += 1
        if progress:
          progress.update(1)
        last = step == tc.num_train_steps
        if step % tc.log_every == 0 or step == 1 or last or signals.requested:
          check_finite(*pending)
          host = {k: to_python(v) for k, v in jax.device_get(metrics).items()}
          host["tokens_per_s"] = timed_steps * tokens_per_step / max(time.perf_counter() - timer, 1e-9)
          host.update(extra_metrics())
          writer.write(step, host)
          history.append({"step": step, **host})
          if progress:
            postfix = {"loss": f"{host['cross_entropy_loss']:.3f}", "tok/s": f"{host['tokens_per_s']:,.0f}"}
            if "router/dropped_fraction" in host:
              postfix["dropped"] = f"{100 * host['router/dropped_fraction']:.1f}%"
            progress.set_postfix(postfix, refresh=False)
        if (tc.eval_every and step % tc.eval_every == 0) or last:
          check_finite(*pending)
          eval_metrics = evaluate(step, state)
          writer.write(step, eval_metrics, prefix="eval/")
          eval_history.append({"step": step, **eval_metrics})
        if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or last or signals.requested:
          check_finite(*pending)                      # never checkpoint a non-finite state:
          if not bool(_all_finite(state.params)):      # (a finite loss can still leave inf parameters)
            raise NonFiniteLossError(f"parameters became non-finite in the update of step {step}; no "
                                     f"checkpoint of this state was written (last step's metrics: "
                                     f"loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])})")
          save(step, state)
        if signals.requested:
          interrupted = signals.requested
          log.warning("%s received: saved a checkpoint at step %d and stopped", interrupted, step)
          break
  finally:
    if progress:
      progress.close()
  return LoopResult(state, step, history, eval_history, interrupted)


def train(model_config: ModelConfig, train_config: TrainConfig, data_config: DataConfig = DataConfig(),
          mesh_config: MeshConfig = MeshConfig(), model_dir: str | Path = "runs/switchx",
          operative_config: str = "", show_progress: bool = True, name: str = "train", init_params=None,
          add_to_batch: Callable[[dict], dict] | None = None, init_data_state: dict | None = None,
          init_opt_state: Callable[[Any], Any] | None = None) -> dict:
  """Trains `model_config` from scratch (or from `init_params`, a parameter tree such as an upcycled model's,
  with a fresh optimizer state), or resumes the run in model_dir. add_to_batch(host batch) -> extra arrays for
  each training batch (distillation's teacher_logits). init_data_state (a checkpoint's data position, e.g. the
  dense run an upcycled model continues) starts a new run's data there instead of at the corpus' beginning.
  init_opt_state(the fresh optimizer state around init_params, on the host) -> the one to start from (e.g. the
  dense run's moments carried into an upcycled model). -> a summary (losses, histories, speed)."""
  t0 = time.perf_counter()
  # --- 1. Checks that cost nothing, and the run directory -------------------------------------------------
  if train_config.distill_soft_weight > 0 and add_to_batch is None:
    raise ValueError(f"TrainConfig.distill_soft_weight={train_config.distill_soft_weight} needs a teacher: use "
                     "`switchx distill --teacher DIR` (switchx.train.distill), or set it to 0.")
  model_dir = Path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  record = config_record(model=model_config, train=train_config, data=data_config, mesh=mesh_config)

  # --- 2. Processes and mesh ------------------------------------------------------------------------------
  maybe_initialize_distributed()
  process_index, process_count = jax.process_index(), jax.process_count()
  if train_config.batch_size % process_count:
    raise ValueError(f"TrainConfig.batch_size={train_config.batch_size} must be divisible by the "
                     f"{process_count} processes (each reads its own share of the data).")
  partitioner = Partitioner(make_mesh(mesh_config))
  partitioner.check_batch(train_config.batch_size)

  # --- 3. Data (each process reads its own share) ---------------------------------------------------------
  tokenizer, train_data, eval_batches = load_data(data_config, train_config, process_index, process_count,
                                                  causal=isinstance(model_config, DecoderOnlyConfig))
  check_vocab(model_config, tokenizer.vocab_size - 1, f"the tokenizer's ids (vocabulary {tokenizer.vocab_size})")
  if init_data_state is not None:   # checked against this pipeline's corpus and settings; a resume overrides it
    train_data.set_state(init_data_state)

  # --- 4. Model, optimizer, shardings (validated), compiled steps ------------------------------------------
  if add_to_batch is not None:
    train_data = WithExtras(train_data, add_to_batch)
    example = {**eval_batches[0], **add_to_batch(eval_batches[0])}
  else:
    example = eval_batches[0]
  global_shapes = {k: np.zeros((train_config.batch_size,) + v.shape[1:], v.dtype) for k, v in example.items()}
  run = state_lib.build(model_config, train_config, partitioner, global_shapes)
  rng = jax.random.PRNGKey(train_config.seed + 1)  # folded with the step inside train_step
  log.info("compiling the train step")
  run.compile_train_step(global_shapes, rng)        # before the state exists: compiling's memory is given back

  # --- 5. Restore or initialise -----------------------------------------------------------------------------
  checkpoints = Checkpointer(model_dir / "checkpoints", keep=train_config.keep_checkpoints)
  resumed = resume(checkpoints, run.abstract_state(), record, model_dir, train_data)
  if resumed is None and init_params is not None:
    state = run.init_from_params(init_params)
    if init_opt_state is not None:
      opt_state = init_opt_state(jax.device_get(state.opt_state))
      state = state.replace(opt_state=jax.device_put(opt_state, run.state_shardings.opt_state))
    resumed = state, 0
  state, step = resumed or (run.init(jax.random.PRNGKey(train_config.seed)), 0)
  if process_index == 0:
    (model_dir / "config.json").write_text(json.dumps(record, indent=1))
    if operative_config:
      (model_dir / "config.gin").write_text(operative_config)

  # --- 6. The loop ------------------------------------------------------------------------------------------
  writer = MetricWriter(model_dir, enabled=process_index == 0)
  try:
    result = run_loop(
        run, state, step, train_data, rng, train_config, writer, name=name,
        show_progress=show_progress and process_index == 0,
        save=lambda step, state: checkpoints.save(step, state, {"data": train_data.get_state(), "config": record}),
        evaluate=lambda step, state: evaluate(run, state.params, eval_batches))
  finally:  # also on errors: finish writing the (good) checkpoints already started
    checkpoints.close()
    writer.close()
  step, history, eval_history, interrupted = result.step, result.history, result.eval_history, result.interrupted
  last_train = history[-1] if history else {}
  return {
      "name": name, "model_dir": str(model_dir), "final_step": step, "interrupted": interrupted,
      "train_loss": last_train.get("cross_entropy_loss"), "initial_train_loss":
      history[0].get("cross_entropy_loss") if history else None,
      "eval_loss": eval_history[-1]["cross_entropy_loss"] if eval_history else None,
      "tokens_per_s": last_train.get("tokens_per_s"), "dropped_fraction": last_train.get("router/dropped_fraction"),
      "history": history, "eval_history": eval_history, "wall_s": time.perf_counter() - t0,
  }

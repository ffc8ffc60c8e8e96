"""`switchx demo`: a tiny Switch model and its FLOP-matched dense twin trained on the built-in corpus.

Runs in a few minutes on a 2-core laptop with nothing downloaded: builds the corpus (Python's own reference
manual and docstrings), trains a SentencePiece vocabulary on it, span-corrupts and packs it as T5 does, trains
both models with the same data order, prints a table and writes a loss-curve plot.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from switchx import model_stats
from switchx.config import ModelConfig, MoeConfig, TrainConfig
from switchx.data import Pipeline, builtin_corpus, split_documents, train_tokenizer
from switchx.models.encoder_decoder import EncoderDecoder
from switchx.train import optim, step as step_lib


def demo_configs(vocab_size: int) -> dict[str, ModelConfig]:
  """The tiny Switch model (8 experts, every other FFN sparse) and its dense twin (same FLOPs per token)."""
  switch = ModelConfig(
      vocab_size=vocab_size, d_model=128, num_heads=4, head_dim=32, d_ff=512, num_encoder_layers=2,
      num_decoder_layers=2, activation="relu", relative_attention_num_buckets=16,
      relative_attention_max_distance=64, init_scale=0.1, encoder_sparse="every:2", decoder_sparse="every:2",
      moe=MoeConfig(num_experts=8, group_size=1024, train_capacity_factor=1.25, eval_capacity_factor=2.0,
                    min_capacity=4, load_balance_loss_coef=0.01))
  return {"switch-8": switch, "dense": switch.replace(encoder_sparse="none", decoder_sparse="none")}


def _train(name: str, config: ModelConfig, train_cfg: TrainConfig, train_data: Pipeline, eval_batches: list,
           num_steps: int, log_every: int) -> dict:
  model = EncoderDecoder(config)
  optimizer, schedule = optim.make_optimizer(train_cfg)
  first = next(train_data)
  state = jax.jit(functools.partial(step_lib.init_train_state, model, optimizer))(
      jax.random.PRNGKey(train_cfg.seed), first)
  train_step = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer,
                                         schedule=schedule, z_loss_coef=train_cfg.z_loss_coef),
                       donate_argnums=(0,))
  eval_step = jax.jit(functools.partial(step_lib.eval_step, model=model))
  rng = jax.random.PRNGKey(train_cfg.seed + 1)

  def evaluate(params) -> float:
    return float(np.mean([float(eval_step(params, b)["cross_entropy_loss"]) for b in eval_batches]))

  curve = {"step": [], "train_loss": [], "eval_step": [], "eval_loss": []}
  batch, tokens, start, dropped = first, 0, None, []
  print(f"[{name}] compiling ...", flush=True)
  for i in range(num_steps):
    state, metrics = train_step(state, batch, rng)
    if i == 0:
      initial_loss = float(metrics["cross_entropy_loss"])
      start = time.perf_counter()  # throughput excludes compilation
    else:
      tokens += int(batch["encoder_input_tokens"].size + batch["decoder_target_tokens"].size)
    batch = next(train_data)
    if (i + 1) % log_every == 0 or i + 1 == num_steps:
      metrics = jax.device_get(metrics)
      curve["step"].append(i + 1)
      curve["train_loss"].append(float(metrics["cross_entropy_loss"]))
      if "router/dropped_fraction" in metrics:
        dropped.append(float(metrics["router/dropped_fraction"]))
      elapsed = time.perf_counter() - start
      print(f"[{name}] step {i + 1:4d}/{num_steps}  loss {curve['train_loss'][-1]:.3f}  "
            f"{tokens / max(elapsed, 1e-9):,.0f} tokens/s", flush=True)
    if (i + 1) % (num_steps // 4) == 0:
      curve["eval_step"].append(i + 1)
      curve["eval_loss"].append(evaluate(state.params))
  elapsed = time.perf_counter() - start
  return {"name": name, "curve": curve, "tokens_per_s": tokens / elapsed, "final_train_loss":
          curve["train_loss"][-1], "final_eval_loss": curve["eval_loss"][-1],
          "initial_train_loss": initial_loss,
          "dropped_fraction": float(np.mean(dropped[-5:])) if dropped else None,
          **model_stats.param_counts(config)}


def _plot(results: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for r, color in zip(results, ("tab:red", "tab:blue")):
    c = r["curve"]
    ax.plot(c["step"], c["train_loss"], color=color, alpha=0.5, label=f"{r['name']} train")
    ax.plot(c["eval_step"], c["eval_loss"], "o-", color=color, label=f"{r['name']} held-out")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / target token)")
  ax.set_title("switchx demo: Switch (8 experts) vs FLOP-matched dense, built-in corpus")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_demo(out_dir: str = "demo_out", num_steps: int = 300, batch_size: int = 16, inputs_length: int = 128,
             targets_length: int = 32, vocab_size: int = 2000, seed: int = 0, log_every: int = 25) -> list[dict]:
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  documents = builtin_corpus()
  train_docs, eval_docs = split_documents(documents, eval_fraction=0.05, seed=seed)
  tokenizer = train_tokenizer(train_docs, vocab_size=vocab_size)
  print(f"corpus: {len(documents)} documents, {sum(map(len, documents)) / 1e6:.1f} MB of text; tokenizer: "
        f"{tokenizer.vocab_size} ids ({time.perf_counter() - t0:.1f}s)", flush=True)
  train_cfg = TrainConfig(optimizer="adafactor", learning_rate=0.01, schedule="constant", warmup_steps=0,
                          num_train_steps=num_steps, batch_size=batch_size, inputs_length=inputs_length,
                          targets_length=targets_length, seed=seed)
  data = lambda docs, s: Pipeline(docs, tokenizer, batch_size=batch_size, inputs_length=inputs_length,
                                  targets_length=targets_length, seed=s)
  eval_data = data(eval_docs, seed + 1)
  eval_batches = [next(eval_data) for _ in range(4)]

  results = []
  for name, config in demo_configs(tokenizer.vocab_size).items():
    counts = model_stats.param_counts(config)
    print(f"\n{name}: {model_stats.format_count(counts['total_params'])} parameters "
          f"({model_stats.format_count(counts['active_params'])} active per token)")
    for kind, n in model_stats.module_table(config):
      print(f"  {kind:<36s} {n:>10,d}")
    results.append(_train(name, config, train_cfg, data(train_docs, seed), eval_batches, num_steps, log_every))

  _plot(results, out / "loss_curves.png")
  (out / "results.json").write_text(json.dumps(results, indent=1))
  print(f"\n{'model':<10s} {'params':>8s} {'active':>8s} {'loss@start':>10s} {'train loss':>10s} "
        f"{'held-out':>9s} {'tokens/s':>9s} {'dropped':>8s}")
  for r in results:
    dropped = "-" if r["dropped_fraction"] is None else f"{100 * r['dropped_fraction']:.1f}%"
    print(f"{r['name']:<10s} {model_stats.format_count(r['total_params']):>8s} "
          f"{model_stats.format_count(r['active_params']):>8s} {r['initial_train_loss']:>10.3f} "
          f"{r['final_train_loss']:>10.3f} {r['final_eval_loss']:>9.3f} {r['tokens_per_s']:>9,.0f} "
          f"{dropped:>8s}")
  print(f"\nloss curves: {out / 'loss_curves.png'}   numbers: {out / 'results.json'}   "
        f"total time {time.perf_counter() - t0:.0f}s")
  return results

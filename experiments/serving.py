"""What the serving experiments (quantization.py, merging.py, extraction.py) share: the trained Switch models they
measure, the held-out loss of any (config, params), greedy decoding speed and the size of a saved model.

The models are the science issue's best Switch models (experiments/regime.py, candidate narrow_ffn_docstrings:
Switch-8 in every FFN, d_model 64, expert d_ff 64, 1,200 steps of batch 64 on the docstring corpus, gates x8), one
per seed, trained through common.run with their checkpoints kept (the same cache as regime.py's runs).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common, regime
from switchx.config import DecodeConfig, TrainConfig
from switchx.decode import generate
from switchx.interop.native import PARAMS_FILE, save
from switchx.models.encoder_decoder import EncoderDecoder
from switchx.quantize import dequantize
from switchx.train import restore
from switchx.train.loop import load_data
from switchx.train.step import model_inputs, target_weights

CANDIDATE = "narrow_ffn_docstrings"
SWITCH_GIN = ["MoeConfig.routed_scaling_factor=8.0"]        # regime.py's best Switch (README section 7)
QUICK_EXPERTS = 4


def parser(description: str):
  p = common.parser(description)
  p.set_defaults(seeds=3)
  p.add_argument("--decode_rows", type=int, default=16, help="rows decoded to time greedy decoding")
  return p


@dataclasses.dataclass
class Trained:
  """One trained Switch model and the data to measure it on."""
  seed: int
  config: object
  params: dict
  held_out: list                     # held-out batches (the run's own evaluation batches)
  train_batches: object              # the run's training pipeline (calibration data)
  tokenizer: object
  summary: dict                      # common.run's summary of the training run


def trained_models(args, seeds: int | None = None) -> list[Trained]:
  """The Switch models the serving experiments measure, one per seed (trained, or reused from the cache)."""
  if args.quick:
    base = dict(common.QUICK, seeds=1)
    overrides = common.all_sparse(QUICK_EXPERTS)
  else:
    regime_args = regime.parser().parse_args(["--work_dir", args.work_dir, *[f"--gin={g}" for g in args.gin]])
    base = regime.candidate_base(regime.CANDIDATES[CANDIDATE][1], regime_args)
    overrides = [*common.all_sparse(8), *SWITCH_GIN]
  models = []
  for seed in range(1 if args.quick else (seeds or args.seeds)):
    summary = common.run(f"{CANDIDATE}-serving-switch", overrides, seed, base, args.work_dir, keep_model=True)
    loaded = restore.load_model(summary["model_dir"])
    record = restore.read_record(summary["model_dir"])
    train = TrainConfig(**record["train"])
    tokenizer, pipeline, held_out = load_data(restore.data_config_from(record["data"]), train)
    models.append(Trained(seed, loaded.config, jax.device_get(loaded.params), held_out, pipeline, tokenizer, summary))
  return models


@functools.lru_cache(maxsize=16)
def _token_losses(config):
  """Jitted (params, batch) -> (summed target cross-entropy, target tokens) of `config`'s model in eval mode."""
  model = EncoderDecoder(config.replace(dropout_rate=0.0))

  def losses(params, batch):
    logits, _ = model.apply({"params": dequantize(params)}, **model_inputs(batch))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["decoder_target_tokens"])
    weights = target_weights(batch)
    return (ce * weights).sum(), weights.sum()

  return jax.jit(losses)


def held_out_loss(config, params, batches) -> float:
  """Cross-entropy per target token over `batches`, in eval mode (the config's eval capacity factor); quantized
  parameters are dequantized inside the jitted step, as decoding does."""
  total = count = 0.0
  for batch in batches:
    loss, n = _token_losses(config)(params, {k: jnp.asarray(v) for k, v in model_inputs(batch).items()})
    total, count = total + float(loss), count + float(n)
  return total / max(count, 1.0)


def decode_speed(config, params, encoder_tokens, max_length: int = 32, repeats: int = 5, **generate_kwargs) -> float:
  """Generated tokens per second of greedy decoding (decoding's default: no token dropped), the median of
  `repeats` timed calls after one that compiles; every row decodes max_length steps (EOS does not stop the
  timing short: the while loop runs until every row is done, so rows are counted as decoded to max_length)."""
  decode = DecodeConfig(max_decode_length=max_length)
  jax.block_until_ready(generate(config, params, encoder_tokens, decode, **generate_kwargs).tokens)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = generate(config, params, encoder_tokens, decode, **generate_kwargs)
    jax.block_until_ready(result.tokens)
    times.append(time.perf_counter() - start)
  steps = int(np.max(np.sum(np.asarray(result.tokens) > 0, axis=1))) + 1    # the loop's steps (EOS included)
  return encoder_tokens.shape[0] * min(steps, max_length) / statistics.median(times)


def saved_size(config, params) -> int:
  """Bytes of the saved model's parameter file (switchx.save's safetensors, quantized codes packed)."""
  with tempfile.TemporaryDirectory() as directory:
    save(config, params, directory)
    return (Path(directory) / PARAMS_FILE).stat().st_size


def expert_params(params) -> int:
  """Parameters in the experts' weights (every MoE layer)."""
  import flax.traverse_util
  return sum(int(np.size(v)) for p, v in flax.traverse_util.flatten_dict(params).items() if "experts" in p)


def mean_spread(values) -> tuple[float, float]:
  return common.mean_spread(list(values))


def axes(size=(6.5, 4)):
  """(figure, axes) for one of the serving plots (matplotlib without a display)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt.subplots(figsize=size)


def save_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size=None) -> None:
  import matplotlib.pyplot as plt
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=legend_size)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)

"""Small run directories for the eval / decode / fine-tuning tests, written without training (seconds)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from random_params import random_params
from switchx import data as data_lib
from switchx.config import DataConfig, ModelConfig, MoeConfig, TrainConfig
from switchx.data.tasks import docstring_task, write_docstring_task
from switchx.parallel.mesh import MeshConfig
from switchx.train import loop, optim
from switchx.train.checkpoint import Checkpointer
from switchx.train.step import TrainState

TOKENIZER_PIECES = 256


def tiny_model(**changes) -> ModelConfig:
  """One encoder and one decoder layer, both sparse (4 experts): the smallest model with every MoE path."""
  base = dict(vocab_size=TOKENIZER_PIECES + 100, d_model=32, num_heads=4, head_dim=8, d_ff=64,
              num_encoder_layers=1, num_decoder_layers=1, activation="relu", relative_attention_num_buckets=8,
              relative_attention_max_distance=16, encoder_sparse="all", decoder_sparse="all",
              moe=MoeConfig(num_experts=4, group_size=64, min_capacity=1))
  return ModelConfig(**{**base, **changes})


def command_flags(model: ModelConfig, tokenizer_path: Path, steps: int = 30) -> list[str]:
  """gin flags that make a `switchx train`-style command build `model` (a tiny_model) and train it `steps` steps
  on the built-in corpus with the task tokenizer, logging every step, evaluating only at the end."""
  fields = ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers", "num_decoder_layers",
            "activation", "relative_attention_num_buckets", "relative_attention_max_distance", "encoder_sparse",
            "decoder_sparse")
  return ([f"--gin.ModelConfig.{name}={getattr(model, name)!r}" for name in fields]
          + [f"--gin.MoeConfig.num_experts={model.moe.num_experts}", f"--gin.TrainConfig.num_train_steps={steps}",
             "--gin.TrainConfig.batch_size=8", "--gin.TrainConfig.inputs_length=32",
             "--gin.TrainConfig.targets_length=8", "--gin.TrainConfig.eval_every=0",
             "--gin.TrainConfig.eval_batches=1", "--gin.TrainConfig.log_every=1",
             f"--gin.DataConfig.tokenizer_path='{tokenizer_path}'",
             f"--gin.DataConfig.tokenizer_vocab_size={TOKENIZER_PIECES}"])


def task_tokenizer(directory: Path):
  """A SentencePiece model trained on the offline task's text only (half a second), saved as a file."""
  path = directory / "spm.model"
  if not path.exists():
    task = docstring_task()
    texts = [e["input"] + " " + e["target"] for e in task["train"] + task["validation"]]
    data_lib.train_tokenizer(texts, vocab_size=TOKENIZER_PIECES).save(path)
  return path


def write_task(directory: Path) -> dict:
  return write_docstring_task(directory / "task", max_words=24)


def write_run_dir(directory: Path, model: ModelConfig, train: TrainConfig, tokenizer_path: Path,
                  seed: int = 0) -> Path:
  """What `switchx train` leaves behind (config.json, checkpoints/1), for random parameters (no compile)."""
  if (directory / "config.json").exists():
    return directory
  directory.mkdir(parents=True, exist_ok=True)
  data = DataConfig(source="builtin", tokenizer_path=str(tokenizer_path), tokenizer_vocab_size=TOKENIZER_PIECES)
  record = loop.config_record(model=model, train=train, data=data, mesh=MeshConfig())
  params = jax.tree_util.tree_map(jnp.asarray, random_params(model, seed))
  state = TrainState(step=jnp.ones((), jnp.int32), params=params,
                     opt_state=optim.make_optimizer(train)[0].init(params))
  (directory / "config.json").write_text(json.dumps(record, indent=1))
  checkpoints = Checkpointer(directory / "checkpoints")
  checkpoints.save(1, state, {"config": record})
  checkpoints.close()
  return directory

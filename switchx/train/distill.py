"""Distillation of a (sparse) teacher into a (dense) student (Switch paper, section 5, Tables 6-7).

    summary = distill("runs/switch", student_config, train_config, data_config, model_dir="runs/student")

Each training batch gets the teacher's eval-mode logits (computed by a jitted forward of the teacher, held
fixed), and the student trains on the cross-entropy to a target mixing TrainConfig.distill_soft_weight of the
teacher's probabilities (temperature TrainConfig.distill_temperature) with the rest of the one-hot target
(losses.total_loss; the paper: 0.25 teacher, 0.75 ground truth). The student starts from the teacher's
non-expert weights where their paths and shapes agree (the paper's initialisation; `init_from_teacher`), the
rest fresh. Held-out evaluation scores the student on the hard targets, as for any run. Re-running resumes.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from switchx.config import DataConfig, DecoderOnlyConfig, ModelConfig, TrainConfig, check_vocab
from switchx.models.decoder_only import DecoderOnly
from switchx.models.encoder_decoder import EncoderDecoder
from switchx.parallel.mesh import MeshConfig
from switchx.train import restore, step as step_lib
from switchx.train.loop import train

def model_for(config: ModelConfig | DecoderOnlyConfig) -> EncoderDecoder | DecoderOnly:
  return DecoderOnly(config) if isinstance(config, DecoderOnlyConfig) else EncoderDecoder(config)


def teacher_forward(config: ModelConfig | DecoderOnlyConfig, params):
  """host batch -> {"teacher_logits": [B, L, V] float32 numpy}: the teacher in eval mode (eval capacity) on the
  inputs the student sees (an encoder-decoder's MODEL_INPUTS; a decoder-only model's tokens, segments, positions)."""
  model = model_for(config)
  apply = jax.jit(lambda params, batch: step_lib.apply_model(model, {"params": params}, batch, train=False)[0])
  keys = step_lib.MODEL_INPUTS

  def add_to_batch(batch: dict) -> dict:
    inputs = {k: jnp.asarray(batch[k]) for k in keys if k in batch}
    return {"teacher_logits": np.asarray(apply(params, inputs), np.float32)}

  return add_to_batch


def student_params_from_teacher(student: ModelConfig | DecoderOnlyConfig, teacher_params, rng: jax.Array,
                                example: dict) -> dict:
  """A fresh student, with every parameter whose path and shape the teacher shares copied from the teacher
  (embeddings, attention, norms, the dense FFNs of layers dense in both; never experts or routers)."""
  model = model_for(student)
  fresh = jax.device_get(step_lib.init_params(model, rng, example))
  teacher = {jax.tree_util.keystr(path): leaf for path, leaf in
             jax.tree_util.tree_flatten_with_path(jax.device_get(teacher_params))[0]}

  def pick(path, leaf):
    theirs = teacher.get(jax.tree_util.keystr(path))
    return np.asarray(theirs, np.float32) if theirs is not None and np.shape(theirs) == np.shape(leaf) else leaf

  return jax.tree_util.tree_map_with_path(pick, fresh)


def distill(teacher_dir: str | Path, model_config: ModelConfig, train_config: TrainConfig,
            data_config: DataConfig = DataConfig(), mesh_config: MeshConfig = MeshConfig(),
            model_dir: str | Path = "runs/student", init_from_teacher: bool = True, operative_config: str = "",
            show_progress: bool = True) -> dict:
  """Trains `model_config` (the student) on the teacher in `teacher_dir` (a run directory, its best/, or a
  switchx.save directory), with TrainConfig.distill_soft_weight (must be > 0) of its probabilities."""
  if not train_config.distill_soft_weight > 0:
    raise ValueError("TrainConfig.distill_soft_weight is 0: the teacher would not count. The Switch paper uses "
                     "0.25 (--soft_weight 0.25, or --gin.TrainConfig.distill_soft_weight=0.25).")
  teacher = restore.load_model(teacher_dir)
  if type(teacher.config) is not type(model_config):
    raise ValueError(f"the teacher in {teacher_dir} is a {type(teacher.config).__name__}, the student a "
                     f"{type(model_config).__name__}: distillation compares their next-token distributions on the "
                     "same inputs, so both must be of one family. Give a student preset of the teacher's family.")
  if teacher.config.vocab_size != model_config.vocab_size:
    raise ValueError(f"the student's vocab_size={model_config.vocab_size} differs from the teacher's "
                     f"{teacher.config.vocab_size}: distillation compares their distributions token by token.")
  check_vocab(model_config, teacher.config.vocab_size - 1, "the teacher's vocabulary")
  params = None
  if init_from_teacher:
    length = (1, 8)
    example = {"encoder_input_tokens": jnp.ones(length, jnp.int32), "decoder_input_tokens": jnp.ones(length, jnp.int32)}
    params = student_params_from_teacher(model_config, teacher.params, jax.random.PRNGKey(train_config.seed),
                                         example)
  return train(model_config, train_config, data_config, mesh_config, model_dir=model_dir,
               operative_config=operative_config, show_progress=show_progress, name="distill",
               init_params=params, add_to_batch=teacher_forward(teacher.config, teacher.params))

"""Distillation: soft weight 0 is ordinary training step for step; soft weight 1 trains on the cross-entropy to the
teacher's distribution; the student starts from the teacher's non-expert weights; `switchx distill` trains a
dense student on a sparse teacher through the normal trainer and resumes."""

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from conftest import init_params, tiny_config, tiny_switch_config  # noqa: E402
from run_dirs import command_flags, task_tokenizer, tiny_model, write_run_dir  # noqa: E402
from switchx import cli  # noqa: E402
from switchx.config import DataConfig, TrainConfig  # noqa: E402
from switchx.losses import total_loss  # noqa: E402
from switchx.models.encoder_decoder import EncoderDecoder  # noqa: E402
from switchx.train import loop, optim, step as step_lib  # noqa: E402
from switchx.train.distill import student_params_from_teacher  # noqa: E402


def _batch(seed=0, batch=4, length=8, vocab=64):
  rng = np.random.RandomState(seed)
  targets = rng.randint(3, vocab, (batch, length)).astype(np.int32)
  targets[0, 6:] = 0
  return {"encoder_input_tokens": rng.randint(3, vocab, (batch, 12)).astype(np.int32),
          "decoder_target_tokens": targets,
          "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], 1),
          "decoder_loss_weights": (targets > 0).astype(np.float32),
          "teacher_logits": 3.0 * rng.standard_normal((batch, length, vocab)).astype(np.float32)}


def _steps(config, soft_weight, with_teacher, steps=2):
  model = EncoderDecoder(config)
  train_cfg = TrainConfig(optimizer="adafactor", learning_rate=1e-2, schedule="constant", warmup_steps=0)
  optimizer, schedule = optim.make_optimizer(train_cfg)
  state = step_lib.start_train_state(optimizer, init_params(config))
  step = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer, schedule=schedule,
                                   distill=(soft_weight, 1.0)))
  losses = []
  for i in range(steps):
    batch = _batch(i)
    if not with_teacher:
      batch.pop("teacher_logits")
    state, metrics = step(state, batch, jax.random.PRNGKey(0))
    losses.append(float(metrics["loss"]))
  return state.params, losses


def test_soft_weight_zero_is_ordinary_training_step_for_step():
  config = tiny_switch_config()
  params, losses = _steps(config, 0.0, with_teacher=True)
  plain_params, plain_losses = _steps(config, 0.0, with_teacher=False)
  assert losses == plain_losses
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, plain_params)
  # and the teacher does count as soon as it has weight
  _, weighted = _steps(config, 0.25, with_teacher=True, steps=1)
  assert weighted[0] != losses[0]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_soft_weight_one_is_the_cross_entropy_to_the_teachers_distribution(temperature):
  config = tiny_config()
  batch = _batch()
  logits, aux = EncoderDecoder(config).apply({"params": init_params(config)},
                                             **step_lib.model_inputs(batch), train=False)
  loss, metrics = total_loss(config, logits, aux, batch, z_loss_coef=0.0, soft_weight=1.0, temperature=temperature)
  teacher = np.asarray(jax.nn.softmax(batch["teacher_logits"].astype(np.float64) / temperature, -1))
  log_student = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64) / temperature, -1))
  weights = batch["decoder_loss_weights"]
  expected = (-(teacher * log_student).sum(-1) * weights).sum() / weights.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["distill_loss"]), expected, rtol=1e-5)
  hard = float(total_loss(config, logits, aux, batch, z_loss_coef=0.0)[0])
  assert abs(float(metrics["cross_entropy_loss"]) - hard) < 1e-6 and abs(hard - expected) > 1e-2


def test_student_starts_from_the_teachers_non_expert_weights():
  teacher_config, student_config = tiny_switch_config(), tiny_config()
  teacher = init_params(teacher_config, seed=1)
  tokens = jnp.ones((1, 4), jnp.int32)
  student = student_params_from_teacher(student_config, teacher, jax.random.PRNGKey(0),
                                        {"encoder_input_tokens": tokens, "decoder_input_tokens": tokens})
  fresh = init_params(student_config)
  np.testing.assert_array_equal(student["token_embedder"]["embedding"], teacher["token_embedder"]["embedding"])
  np.testing.assert_array_equal(student["encoder"]["layers_1"]["attention"]["query"]["kernel"],
                                teacher["encoder"]["layers_1"]["attention"]["query"]["kernel"])
  np.testing.assert_array_equal(student["encoder"]["layers_0"]["mlp"]["wo"]["kernel"],   # dense in both
                                teacher["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])
  np.testing.assert_array_equal(student["encoder"]["layers_1"]["mlp"]["wo"]["kernel"],   # sparse in the teacher
                                fresh["encoder"]["layers_1"]["mlp"]["wo"]["kernel"])


def test_plain_training_with_a_soft_weight_fails_before_building(tmp_path):
  with pytest.raises(ValueError, match="needs a teacher"):
    loop.train(tiny_config(), TrainConfig(distill_soft_weight=0.25), DataConfig(), model_dir=tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_command_line_distils_a_sparse_teacher_into_a_dense_student_and_resumes(tmp_path, capsys):
  tokenizer = task_tokenizer(tmp_path)
  teacher = tiny_model()                                            # every FFN sparse, 4 experts
  run = write_run_dir(tmp_path / "teacher", teacher, TrainConfig(batch_size=8, inputs_length=32,
                                                                 targets_length=8), tokenizer)
  student = tiny_model(encoder_sparse="none", decoder_sparse="none")
  # soft weight 1: the student learns the (random) teacher's distribution alone, so its distance to it falls
  argv = ["distill", "--teacher", str(run), "--model_dir", str(tmp_path / "student"), "--gin_file", "runs/demo",
          "--soft_weight", "1.0", *command_flags(student, tokenizer)]
  assert cli.main(argv) == 0
  assert "step 30:" in capsys.readouterr().out
  history = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
  soft = [h["distill_loss"] for h in history if "distill_loss" in h]
  assert len(soft) == 30 and np.mean(soft[-5:]) < np.mean(soft[:5])           # the student moves to the teacher
  record = json.loads((tmp_path / "student" / "config.json").read_text())
  assert record["train"]["distill_soft_weight"] == 1.0 and record["model"]["encoder_sparse"] == "none"
  assert cli.main(argv) == 0 and "already trained" in capsys.readouterr().out


# --- decoder-only (causal LM) models -----------------------------------------------------------------------------
def _lm(**changes):
  from switchx.config import DecoderOnlyConfig, MoeConfig
  base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, sparse="all",
              moe=MoeConfig(num_experts=4, group_size=64, min_capacity=1))
  return DecoderOnlyConfig(**{**base, **changes})


def _lm_params(config, seed=0):
  import flax.linen as nn
  from switchx.models.decoder_only import DecoderOnly
  return jax.device_get(nn.unbox(DecoderOnly(config).init(jax.random.PRNGKey(seed), jnp.ones((1, 4), jnp.int32))
                                 ["params"]))


def test_causal_lm_teacher_logits_student_init_and_soft_loss():
  """A decoder-only teacher's logits are its own forward pass on the student's inputs (packed rows included); the
  dense student starts from its non-expert weights; soft weight 1 is the cross-entropy to its distribution."""
  from switchx.models.decoder_only import DecoderOnly
  from switchx.train.distill import teacher_forward
  teacher_config, student_config = _lm(), _lm(sparse="none")
  teacher = _lm_params(teacher_config, seed=1)
  rng = np.random.RandomState(0)
  tokens = rng.randint(1, 64, (2, 10)).astype(np.int32)
  segments = np.array([[1] * 6 + [2] * 4, [1] * 10], np.int32)
  positions = np.array([list(range(6)) + list(range(4)), list(range(10))], np.int32)
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": np.roll(tokens, -1, 1),
           "decoder_segment_ids": segments, "decoder_positions": positions,
           "decoder_loss_weights": np.ones((2, 10), np.float32)}
  got = teacher_forward(teacher_config, teacher)(batch)["teacher_logits"]
  expected = DecoderOnly(teacher_config).apply({"params": teacher}, tokens, segments, positions, train=False)[0]
  np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-6, atol=1e-6)
  unpacked = teacher_forward(teacher_config, teacher)({k: v for k, v in batch.items() if "segment" not in k})
  assert np.abs(unpacked["teacher_logits"][0, 6:] - got[0, 6:]).max() > 1e-4     # the segments were used
  student = student_params_from_teacher(student_config, teacher, jax.random.PRNGKey(0),
                                        {"decoder_input_tokens": jnp.ones((1, 4), jnp.int32)})
  np.testing.assert_array_equal(student["token_embedder"]["embedding"], teacher["token_embedder"]["embedding"])
  np.testing.assert_array_equal(student["layers_1"]["attention"]["query"]["kernel"],
                                teacher["layers_1"]["attention"]["query"]["kernel"])
  assert "mlp" in student["layers_1"] and "moe" not in student["layers_1"]
  batch["teacher_logits"] = got
  logits, aux = DecoderOnly(student_config).apply({"params": student}, tokens, segments, positions, train=False)
  loss, _ = total_loss(student_config, logits, aux, batch, z_loss_coef=0.0, soft_weight=1.0, temperature=1.0)
  teacher_p = np.asarray(jax.nn.softmax(got.astype(np.float64), -1))
  log_student = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), -1))
  np.testing.assert_allclose(float(loss), -(teacher_p * log_student).sum(-1).mean(), rtol=1e-5)


def test_command_line_distils_a_causal_lm_teacher_and_refuses_another_family(tmp_path, capsys):
  common = ["--gin_file", "mixtral_tiny", "--gin.TrainConfig.batch_size=4", "--gin.TrainConfig.inputs_length=24",
            "--gin.TrainConfig.targets_length=8", "--gin.TrainConfig.eval_every=0", "--gin.TrainConfig.eval_batches=1",
            "--gin.TrainConfig.log_every=1", "--gin.DecoderOnlyConfig.num_layers=2", "--gin.MoeConfig.num_experts=4"]
  assert cli.main(["train", "--model_dir", str(tmp_path / "teacher"), *common,
                   "--gin.TrainConfig.num_train_steps=4"]) == 0
  argv = ["distill", "--teacher", str(tmp_path / "teacher"), "--model_dir", str(tmp_path / "student"), *common,
          "--gin.TrainConfig.num_train_steps=20", "--gin.DecoderOnlyConfig.sparse='none'", "--soft_weight", "1.0"]
  assert cli.main(argv) == 0
  history = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
  soft = [h["distill_loss"] for h in history if "distill_loss" in h]
  assert len(soft) == 20 and np.mean(soft[-5:]) < np.mean(soft[:5])           # the student moves to the teacher
  record = json.loads((tmp_path / "student" / "config.json").read_text())
  assert record["model"]["architecture"] == "decoder_only" and record["model"]["sparse"] == "none"
  capsys.readouterr()
  wrong = ["distill", "--teacher", str(tmp_path / "teacher"), "--model_dir", str(tmp_path / "wrong"), "--gin_file",
           "models/switch_cpu"]
  assert cli.main(wrong) != 0 and "both must be of one family" in capsys.readouterr().err

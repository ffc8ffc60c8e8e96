"""Task-level routing (MoeConfig.route_by="task") and extraction of a task's sub-network (switchx/extract.py):
the extracted model gives the full model's logits on its task's inputs (top-1 and top-2, with the gate variants),
decodes the same tokens alone after save / load, and a wrong task's sub-network does not; mixtures carry each
token's task id; a token-routed checkpoint fine-tunes as a task-routed model and `switchx extract` serves it."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_dirs
from switchx import api, cli
from switchx.config import DecodeConfig, FinetuneConfig, ModelConfig, MoeConfig, TaskConfig
from switchx.data import Tokenizer
from switchx.data.tasks import Mixture, load_task
from switchx.decode import generate
from switchx.extract import extract_task, task_usage
from switchx.models.encoder_decoder import EncoderDecoder
from switchx.train import restore
from switchx.train.finetune import finetune, finetune_train_config

NUM_TASKS, VOCAB = 3, 64


def _task_model(**moe_changes) -> ModelConfig:
  moe = MoeConfig(num_experts=4, route_by="task", num_tasks=NUM_TASKS, eval_capacity_factor=0.0, **moe_changes)
  return ModelConfig(vocab_size=VOCAB, d_model=16, d_ff=32, num_heads=2, head_dim=8, num_encoder_layers=2,
                     num_decoder_layers=2, encoder_sparse="all", decoder_sparse="every:2", init_scale=1.0, moe=moe)


def _init(config: ModelConfig, seed: int = 0):
  """Random parameters, the task tables scaled up so that tasks take different experts with unequal gates."""
  rng = np.random.default_rng(seed)
  enc, dec = rng.integers(1, VOCAB, (4, 9)), rng.integers(1, VOCAB, (4, 6))
  params = flax.core.meta.unbox(EncoderDecoder(config).init(jax.random.PRNGKey(seed), enc, dec)["params"])
  flat = flax.traverse_util.flatten_dict(params)
  for path in flat:
    if path[-1] == "task_router":
      flat[path] = jnp.asarray(rng.normal(0.0, 1.5, flat[path].shape), jnp.float32)
    if path[-1] == "router_bias":
      flat[path] = jnp.asarray(rng.normal(0.0, 1.0, flat[path].shape), jnp.float32)
  enc[0, 6:] = 0                                                            # a padded row
  return flax.traverse_util.unflatten_dict(flat), jnp.asarray(enc), jnp.asarray(dec)


def _full_logits(config, params, enc, dec, task):
  tasks = jnp.full((enc.shape[0],), task, jnp.int32)
  logits, _ = EncoderDecoder(config).apply({"params": params}, enc, dec, encoder_task_ids=tasks,
                                           decoder_task_ids=tasks)
  return np.asarray(logits)


@pytest.mark.parametrize("moe_changes", [dict(top_k=1), dict(top_k=2), dict(top_k=2, normalize_gates=True),
                                         dict(top_k=1, routed_scaling_factor=4.0, bias_balance_rate=1e-3)],
                         ids=["top1", "top2", "top2-normalized", "top1-scaled-biased"])
def test_extracted_task_gives_the_full_models_logits(moe_changes):
  config = _task_model(**moe_changes)
  params, enc, dec = _init(config)
  usage = task_usage(config, params)
  assert len({tuple(map(tuple, u)) for u in zip(*usage.values())}) > 1, "tasks should take different experts"
  extracted = {}
  for task in range(NUM_TASKS):
    task_config, task_params = extract_task(config, params, task)
    assert task_config.moe.num_experts == config.moe.top_k and task_config.moe.num_tasks == 1
    got, _ = EncoderDecoder(task_config).apply({"params": task_params}, enc, dec)  # no task ids needed
    want = _full_logits(config, params, enc, dec, task)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)
    extracted[task] = np.asarray(got)
  # Another task's sub-network is not this task's model: the comparison above can fail.
  differs = [np.abs(extracted[t] - _full_logits(config, params, enc, dec, (t + 1) % NUM_TASKS)).max()
             for t in range(NUM_TASKS)]
  assert max(differs) > 1e-2


def test_extraction_keeps_only_the_tasks_experts_and_scales_their_outputs():
  config = _task_model(top_k=1)
  params, _, _ = _init(config)
  task_config, task_params = extract_task(config, params, 1)
  layer = ("encoder", "layers_0", "moe")
  full = flax.traverse_util.flatten_dict(params)
  table = np.asarray(full[layer + ("task_router",)][1])
  expert = int(np.argmax(table))
  gate = np.exp(table[expert]) / np.exp(table).sum()
  small = flax.traverse_util.flatten_dict(task_params)
  np.testing.assert_array_equal(small[layer + ("experts", "wi_0")][0], full[layer + ("experts", "wi_0")][expert])
  np.testing.assert_allclose(small[layer + ("experts", "wo")][0], gate * full[layer + ("experts", "wo")][expert],
                             rtol=1e-6)
  np.testing.assert_array_equal(small[layer + ("task_router",)], np.zeros((1, 1)))
  full_experts = sum(v.size for p, v in full.items() if "experts" in p)
  small_experts = sum(v.size for p, v in small.items() if "experts" in p)
  assert small_experts * config.moe.num_experts == full_experts


def test_extracted_model_saves_loads_and_decodes_the_tasks_tokens(tmp_path):
  config = _task_model(top_k=2)
  params, enc, _ = _init(config, seed=1)
  decode = DecodeConfig(max_decode_length=6)
  for task in (0, 2):
    api.save(*extract_task(config, params, task), str(tmp_path / f"task{task}"))
    task_config, task_params = api.load(str(tmp_path / f"task{task}"))
    want = generate(config, params, enc, decode, task_ids=task)
    got = generate(task_config, task_params, enc, decode)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), atol=1e-4)
    beam = dataclasses.replace(decode, strategy="beam", beam_size=2)
    np.testing.assert_array_equal(np.asarray(generate(task_config, task_params, enc, beam).tokens),
                                  np.asarray(generate(config, params, enc, beam, task_ids=task).tokens))


def test_task_routing_needs_task_ids_and_refuses_bad_ones():
  config = _task_model()
  params, enc, dec = _init(config)
  with pytest.raises(ValueError, match="task id"):
    EncoderDecoder(config).apply({"params": params}, enc, dec)
  with pytest.raises(ValueError, match="task_ids"):
    generate(config, params, enc, DecodeConfig(max_decode_length=2))
  with pytest.raises(ValueError, match="0 .. 2"):
    generate(config, params, enc, DecodeConfig(max_decode_length=2), task_ids=3)
  with pytest.raises(ValueError, match="tasks 0 .. 2"):
    extract_task(config, params, 3)
  token_config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, route_by="token", num_tasks=0))
  with pytest.raises(ValueError, match="task-routed"):
    extract_task(token_config, params, 0)
  with pytest.raises(ValueError, match="route_by='task'"):
    from switchx.interop.hf import export_hf
    export_hf(dataclasses.replace(config, activation="relu", moe=dataclasses.replace(config.moe, top_k=1)), params,
              "/nonexistent/never-written")
  with pytest.raises(ValueError, match="num_tasks"):
    MoeConfig(route_by="task")
  with pytest.raises(ValueError, match="route_by"):
    MoeConfig(route_by="task", num_tasks=2, router="experts_choose")


def test_mixture_batches_carry_each_tokens_task(tmp_path):
  tokenizer = Tokenizer.load(run_dirs.task_tokenizer(tmp_path))
  task = run_dirs.write_task(tmp_path)
  configs = [TaskConfig(name=f"t{i}", train_path=task["train_path"], input_prefix=prefix)
             for i, prefix in enumerate(["first: ", "second: "])]
  tasks = [load_task(c, tokenizer, 64, 8) for c in configs]
  prefixes = [tuple(tokenizer.encode(c.input_prefix))[:1] for c in configs]
  assert prefixes[0] != prefixes[1]
  batch = next(Mixture(tasks, batch_size=8, inputs_length=64, targets_length=8, seed=0))
  seen = set()
  for side in ("encoder", "decoder"):
    segments, task_ids = batch[f"{side}_segment_ids"], batch[f"{side}_task_ids"]
    assert task_ids.shape == segments.shape
    np.testing.assert_array_equal(task_ids[segments == 0], 0)
    for r in range(segments.shape[0]):
      for s in set(segments[r][segments[r] > 0]):
        ids = set(task_ids[r][segments[r] == s])
        assert len(ids) == 1                                               # one task per example
        if side == "encoder":                                              # and it is the example's own task
          first = tuple(batch["encoder_input_tokens"][r][segments[r] == s][:1])
          assert first == prefixes[ids.pop()]
          seen.add(first)
  assert len(seen) == 2


def test_token_routed_checkpoint_finetunes_by_task_and_extracts(tmp_path, capsys):
  """fine-tuning with route_by='task' replaces the routers by task tables; `switchx extract` writes a task's model
  that decodes what the fine-tuned model decodes for that task."""
  tokenizer_path = run_dirs.task_tokenizer(tmp_path)
  task = run_dirs.write_task(tmp_path)
  model = run_dirs.tiny_model(moe=MoeConfig(num_experts=4, group_size=64, min_capacity=1, top_k=2))
  train = finetune_train_config(num_train_steps=3, batch_size=8, inputs_length=64, targets_length=8,
                                learning_rate=1e-2, log_every=1, eval_every=3, checkpoint_every=3)
  pre = run_dirs.write_run_dir(tmp_path / "pre", model, train, tokenizer_path)
  tasks = tuple(TaskConfig(name=f"t{i}", train_path=task["train_path"], validation_path=task["validation_path"],
                           input_prefix=prefix) for i, prefix in enumerate(["first: ", "second: "]))
  with pytest.raises(ValueError, match="num_tasks=2"):
    finetune(train, FinetuneConfig(init_from=str(pre), tasks=tasks), tmp_path / "bad", show_progress=False,
             moe_changes={"route_by": "task", "num_tasks": 1})
  summary = finetune(train, FinetuneConfig(init_from=str(pre), tasks=tasks, eval_examples=8), tmp_path / "tuned",
                     show_progress=False, model_changes={"dropout_rate": 0.0},
                     moe_changes={"route_by": "task", "num_tasks": 2, "expert_dropout_rate": 0.0})
  assert summary["final_step"] == 3
  tuned = restore.load_model(tmp_path / "tuned")
  assert tuned.config.moe.route_by == "task"
  flat = flax.traverse_util.flatten_dict(jax.device_get(tuned.params))
  assert not any(p[-1] == "router" for p in flat) and any(p[-1] == "task_router" for p in flat)

  assert cli.main(["extract", "--model", str(tmp_path / "tuned"), "--task", "1", "--out", str(tmp_path / "t1")]) == 0
  assert "task 1: 4 -> 2 experts per layer" in capsys.readouterr().out
  small_config, small_params = api.load(str(tmp_path / "t1"))
  restore.load_tokenizer(tmp_path / "t1")                                  # the tokenizer travelled with it
  validation = load_task(tasks[1], Tokenizer.load(tokenizer_path), 64, 8).validation[:8]
  enc = np.zeros((len(validation), 64), np.int32)
  for row, (inputs, _) in enumerate(validation):
    enc[row, :len(inputs)] = inputs
  decode = DecodeConfig(max_decode_length=8)
  np.testing.assert_array_equal(np.asarray(generate(small_config, small_params, enc, decode).tokens),
                                np.asarray(generate(tuned.config, jax.device_get(tuned.params), enc, decode,
                                                    task_ids=1).tokens))

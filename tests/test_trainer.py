"""The training loop end to end: metrics, exact resume after SIGKILL, clean stop on SIGTERM, damaged
checkpoints, the non-finite guard, and bad input rejected before training starts."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers.tiny_run import configs
from switchx.config import DataConfig
from switchx.train import loop
from switchx.train.checkpoint import CheckpointError, Checkpointer
from switchx.train.metrics import read_metrics

CHILD = Path(__file__).resolve().parent / "helpers" / "train_child.py"


def _final_params(model_dir: Path, step: int):
  """The parameters of checkpoint `step`, restored without a template (plain numpy)."""
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(model_dir / "checkpoints" / str(step) / "state")
  return jax.tree_util.tree_map(np.asarray, restored["params"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("uninterrupted")
  summary = loop.train(*configs(30), model_dir=model_dir, show_progress=False)
  return model_dir, summary


def test_run_logs_metrics_and_learns(uninterrupted):
  model_dir, summary = uninterrupted
  assert summary["final_step"] == 30 and summary["interrupted"] is None
  rows = read_metrics(model_dir)
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 5, 10, 15, 20, 25, 30]
  for key in ("loss", "cross_entropy_loss", "accuracy", "learning_rate", "tokens_per_s", "grad_norm",
              "router/dropped_fraction", "router/encoder/layers_1/expert_usage",
              "router/decoder/layers_1/load_balance_loss", "router/encoder/layers_1/router_z_loss"):
    assert key in train_rows[-1], key
  assert len(train_rows[-1]["router/encoder/layers_1/expert_usage"]) == 4
  assert train_rows[-1]["cross_entropy_loss"] < train_rows[0]["cross_entropy_loss"] - 0.5
  assert any("eval/cross_entropy_loss" in r for r in rows)
  assert list((model_dir / "tensorboard").glob("events.out.tfevents.*"))
  assert json.loads((model_dir / "config.json").read_text())["model"]["moe"]["num_experts"] == 4


def _start_child(model_dir, steps=30, delay=0.15, moe_changes=None):
  extra = [json.dumps(moe_changes)] if moe_changes else []
  return subprocess.Popen([sys.executable, str(CHILD), str(model_dir), str(steps), str(delay), *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(model_dir: Path, step: int, process, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (model_dir / "checkpoints" / str(step) / "state" / "_METADATA").exists():
      return
    if process.poll() is not None:
      raise AssertionError("the run ended early:\n" + process.stdout.read()[-3000:])
    time.sleep(0.2)
  process.kill()
  raise AssertionError("no checkpoint appeared in time")


def test_sigkill_then_resume_equals_uninterrupted_run(uninterrupted, tmp_path):
  reference_dir, _ = uninterrupted
  child = _start_child(tmp_path)
  _wait_for_checkpoint(tmp_path, 10, child)
  child.send_signal(signal.SIGKILL)
  child.wait(timeout=60)
  killed_at = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert killed_at < 30, "the run should have been killed mid-way"
  resumed = loop.train(*configs(30), model_dir=tmp_path, show_progress=False)
  assert resumed["final_step"] == 30
  expected, got = _final_params(reference_dir, 30), _final_params(tmp_path, 30)
  for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_bias_balancing_state_survives_sigkill_and_resume_bit_exactly(tmp_path):
  """Bias balancing's per-expert biases are set outside the optimizer, from each step's load: a run killed
  mid-way and resumed ends with the uninterrupted run's biases (and every other parameter), bit for bit, and
  logs them per layer."""
  moe = {"bias_balance_rate": 0.01, "load_balance_loss_coef": 0.0}
  model, train, data = configs(20, moe)
  reference = loop.train(model, train, data, model_dir=tmp_path / "reference", show_progress=False)
  assert reference["final_step"] == 20
  child = _start_child(tmp_path / "killed", steps=20, moe_changes=moe)
  _wait_for_checkpoint(tmp_path / "killed", 5, child)
  child.send_signal(signal.SIGKILL)
  child.wait(timeout=60)
  killed_at = max(int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.isdigit())
  assert killed_at < 20, "the run should have been killed mid-way"
  loop.train(model, train, data, model_dir=tmp_path / "killed", show_progress=False)
  expected, got = _final_params(tmp_path / "reference", 20), _final_params(tmp_path / "killed", 20)
  bias = expected["encoder"]["layers_1"]["moe"]["router_bias"]
  assert np.abs(bias).max() > 0                                               # it moved
  np.testing.assert_array_equal(got["encoder"]["layers_1"]["moe"]["router_bias"], bias)
  for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)
  logged = [r for r in read_metrics(tmp_path / "reference") if "loss" in r][-1]
  assert len(logged["router/decoder/layers_1/router_bias"]) == 4


def test_sigterm_saves_and_stops_cleanly(tmp_path):
  child = _start_child(tmp_path, steps=200)
  _wait_for_checkpoint(tmp_path, 5, child)
  child.send_signal(signal.SIGTERM)
  out, _ = child.communicate(timeout=120)
  assert child.returncode == 0, out[-3000:]
  assert "INTERRUPTED SIGTERM" in out
  final = int(out.split("FINAL_STEP")[1].split()[0])
  assert 5 <= final < 200
  assert (tmp_path / "checkpoints" / str(final)).is_dir()  # saved at the step it stopped


def test_damaged_latest_checkpoint_falls_back_with_a_message(uninterrupted, tmp_path, caplog):
  model_dir = tmp_path / "run"
  shutil.copytree(uninterrupted[0], model_dir)
  checkpoints = Checkpointer(model_dir / "checkpoints")
  run_state = _abstract_state_like(model_dir)
  # Damage the newest step's array data: the read or the fingerprint check fails, the previous step is used.
  for f in (model_dir / "checkpoints" / "30" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\0" * max(f.stat().st_size // 2, 1))
  _, meta, step = checkpoints.restore(run_state)
  assert step == 25 and meta["step"] == 25
  assert "checkpoint step 30" in caplog.text and "unusable" in caplog.text
  # A checkpoint whose values no longer match its fingerprint (silent data damage) is refused too.
  meta_file = model_dir / "checkpoints" / "25" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta["fingerprint"]["params/token_embedder/embedding"][0] += 1.0
  meta_file.write_text(json.dumps(meta))
  _, _, step = Checkpointer(model_dir / "checkpoints").restore(run_state)
  assert step == 20
  with pytest.raises(CheckpointError, match="fingerprint"):
    Checkpointer(model_dir / "checkpoints").restore(run_state, step=25)


def _abstract_state_like(model_dir: Path):
  import orbax.checkpoint as ocp
  meta = ocp.StandardCheckpointer().metadata(model_dir / "checkpoints" / "20" / "state")
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)


def test_non_finite_loss_stops_with_a_diagnostic_and_no_bad_checkpoint(tmp_path):
  model, train, data = configs(40, optimizer="adamw", learning_rate=1e12, checkpoint_every=1)
  with pytest.raises(loop.NonFiniteLossError) as info:
    loop.train(model, train, data, model_dir=tmp_path, show_progress=False)
  message = str(info.value)
  if "parameters became non-finite" in message:  # caught in the update itself, before the loss saw it
    bad_step = int(message.split("step ")[1].split(";")[0])
  else:
    assert "non-finite loss" in message and "at step" in message and "router/encoder/layers_1" in message
    bad_step = int(message.split("at step ")[1].split(";")[0])
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved and max(saved) < bad_step


@pytest.mark.parametrize("data_changes,train_changes,expected", [
    (dict(source="text", paths=("EMPTY",)), {}, "empty|no documents"),
    (dict(source="text", paths=("LATIN1",)), {}, "UTF-8"),
    (dict(source="tfds", tfds_name="c4/en", tfds_data_dir="/nonexistent/tfds"), {}, "nonexistent"),
    ({}, dict(inputs_length=2, targets_length=1), "short|length"),
])
def test_bad_input_fails_before_training(data_changes, train_changes, expected, tmp_path):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
  paths = {"EMPTY": str(tmp_path / "empty.txt"), "LATIN1": str(tmp_path / "latin1.txt")}
  if "paths" in data_changes:
    data_changes = dict(data_changes, paths=tuple(paths[p] for p in data_changes["paths"]))
  model, train, data = configs(5, **train_changes)
  started = time.perf_counter()
  with pytest.raises((ValueError, FileNotFoundError), match=expected):
    loop.train(model, train, DataConfig(**{**data.__dict__, **data_changes}), model_dir=tmp_path / "run",
               show_progress=False)
  assert time.perf_counter() - started < 30  # before any compilation
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path):
  model, train, data = configs(5)
  with pytest.raises(ValueError, match="vocab_size"):
    loop.train(model.replace(vocab_size=300), train, data, model_dir=tmp_path, show_progress=False)


def test_held_out_set_and_tokenizer_do_not_change_with_the_training_seed():
  """Seeds compare on one held-out set in one vocabulary: the training seed changes the training batches,
  DataConfig.split_seed the held-out documents (and so the tokenizer trained on the rest)."""
  model, train, data = configs(5)
  tokenizer0, train0, held_out0 = loop.load_data(data, train)
  tokenizer1, train1, held_out1 = loop.load_data(data, train.__class__(**{**train.__dict__, "seed": 1}))
  assert tokenizer0._model_proto == tokenizer1._model_proto        # the same SentencePiece model
  for a, b in zip(held_out0, held_out1):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any(not np.array_equal(a, b) for a, b in zip(next(train0).values(), next(train1).values()))
  _, _, held_out_other = loop.load_data(DataConfig(**{**data.__dict__, "split_seed": 1}), train)
  assert any(not np.array_equal(a[k], b[k]) for a, b in zip(held_out0, held_out_other) for k in a)


def test_a_run_checkpointed_before_a_config_field_existed_still_resumes():
  """A checkpoint's config record lacking fields added to switchx since (here MoeConfig.expert_map and
  ModelConfig.init_scale removed from the saved record) counts as recording their defaults; a field that
  differs still stops the resume."""
  model, _, _ = configs(2)
  current = json.loads(json.dumps(loop.config_record(model=model)["model"]))
  old = json.loads(json.dumps(current))
  del old["moe"]["expert_map"], old["init_scale"]
  assert loop.with_defaults(old, current) == current
  changed = dict(old, d_model=old["d_model"] * 2)
  assert loop.with_defaults(changed, current) != current
  changed_moe = json.loads(json.dumps(old))
  changed_moe["moe"]["num_experts"] = 8
  assert loop.with_defaults(changed_moe, current) != current

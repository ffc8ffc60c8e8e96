"""switchx.save / load / logits and api.convert: bit-exact round trips, transformers directories,
mismatched checkpoints failing clearly, and a cheap `import switchx`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import switchx
from conftest import jitted_apply, tiny_config, tiny_switch_config
from random_params import random_params
from switchx.config import MoeConfig
from switchx.api import convert
from switchx.interop import export_hf
from switchx.interop.param_tree import flatten

pytest.importorskip("safetensors", reason="switchx.save / load and export_hf write safetensors files")


def _assert_same(params, reference):
  params, reference = flatten(params), flatten(reference)
  assert params.keys() == reference.keys()
  for path in reference:
    assert np.asarray(params[path]).dtype == np.float32
    assert np.array_equal(np.asarray(params[path]), np.asarray(reference[path])), path


def _tokens(shape, seed, vocab=64):
  return np.random.RandomState(seed).randint(2, vocab, shape).astype(np.int32)


def test_import_switchx_is_cheap_and_lazy():
  code = ("import sys, switchx; assert 'jax' not in sys.modules, 'import switchx pulled in jax'; "
          "assert callable(switchx.load) and callable(switchx.logits) and callable(switchx.save)")
  subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  with pytest.raises(AttributeError, match="no attribute 'nothing'"):
    switchx.nothing


def test_save_load_round_trip_is_bit_exact(tmp_path):
  config = tiny_config(activation="relu", encoder_sparse=(0, 1), decoder_sparse="every:2", dtype="bfloat16",
                       moe=MoeConfig(num_experts=2, semantics="transformers", expert_capacity=5,
                                     jitter_noise=0.01, load_balance_loss_coef=0.02, dispatch="index"))
  params = random_params(config)
  switchx.save(config, params, str(tmp_path))
  stored = json.load(open(tmp_path / "config.json"))
  assert stored["switchx_format_version"] == 1 and stored["moe"]["semantics"] == "transformers"
  loaded_config, loaded = switchx.load(str(tmp_path))
  assert loaded_config == config
  _assert_same(loaded, params)


def test_logits_are_the_models_eval_logits(tmp_path):
  config = tiny_switch_config()
  params = random_params(config, seed=2)
  switchx.save(config, params, str(tmp_path))
  enc, dec = _tokens((3, 12), 0), _tokens((3, 7), 1)
  expected, _ = jitted_apply(config)({"params": params}, enc, dec)
  ours = switchx.logits(*switchx.load(str(tmp_path)), enc, dec)  # a separate jit: allow rounding differences
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="integer token ids"):
    switchx.logits(config, params, enc.astype(np.float32), dec)
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    switchx.logits(config, params, enc[0], dec)
  with pytest.raises(ValueError, match="same batch"):
    switchx.logits(config, params, enc[:2], dec)
  with pytest.raises(ValueError, match="vocab_size"):
    switchx.logits(config, params, enc + 64, dec)


def test_load_reads_transformers_directories(tmp_path):
  config = tiny_config(activation="gated-gelu", logits_via_embedding=False)
  params = random_params(config, seed=3)
  export_hf(config, params, str(tmp_path))  # a T5ForConditionalGeneration directory; no torch needed
  loaded_config, loaded = switchx.load(str(tmp_path))
  assert loaded_config == config
  _assert_same(loaded, params)


def _edit_config(path, **changes):
  stored = json.load(open(path / "config.json"))
  stored.update(changes)
  (path / "config.json").write_text(json.dumps(stored))


def test_mismatched_or_foreign_checkpoints_fail_clearly(tmp_path):
  config = tiny_config()
  switchx.save(config, random_params(config), str(tmp_path))
  _edit_config(tmp_path, d_ff=128)
  with pytest.raises(ValueError, match=r"encoder/layers_0/mlp/wi_0/kernel has shape \(32, 64\), "
                                       r"the config implies \(32, 128\)"):
    switchx.load(str(tmp_path))
  _edit_config(tmp_path, d_ff=64, experts_per_layer=3)
  with pytest.raises(ValueError, match=r"unknown config fields \['experts_per_layer'\]"):
    switchx.load(str(tmp_path))
  _edit_config(tmp_path, experts_per_layer=None)
  stored = json.load(open(tmp_path / "config.json"))
  del stored["experts_per_layer"], stored["switchx_format_version"]
  (tmp_path / "config.json").write_text(json.dumps(stored))
  with pytest.raises(ValueError, match="neither a switchx config.*nor a transformers one"):
    switchx.load(str(tmp_path))
  _edit_config(tmp_path, switchx_format_version=2)
  with pytest.raises(ValueError, match="switchx_format_version 2 is not supported"):
    switchx.load(str(tmp_path))
  _edit_config(tmp_path, switchx_format_version=1)
  os.remove(tmp_path / "params.safetensors")
  with pytest.raises(FileNotFoundError, match="no params.safetensors"):
    switchx.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    switchx.load(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="missing parameters: decoder/logits_dense/kernel"):  # nothing written
    switchx.save(config, random_params(config.replace(logits_via_embedding=True)), str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()


def test_convert_between_formats(tmp_path):
  from test_interop_t5x import t5x_layout, write_orbax

  config = tiny_config(activation="relu", logits_via_embedding=True)
  params = random_params(config, seed=4)
  export_hf(config, params, str(tmp_path / "hf"))
  assert convert(str(tmp_path / "hf"), str(tmp_path / "sx"), "hf", "switchx") == config
  assert convert(str(tmp_path / "sx"), str(tmp_path / "hf2"), "switchx", "hf") == config
  _assert_same(switchx.load(str(tmp_path / "hf2"))[1], params)

  t5x = write_orbax(tmp_path / "t5x", t5x_layout(config, params, flat_attention=True))
  with pytest.raises(ValueError, match="needs the model config"):
    convert(t5x, str(tmp_path / "from_t5x"), "t5x", "switchx")
  assert convert(t5x, str(tmp_path / "from_t5x"), "t5x", "switchx", str(tmp_path / "sx" / "config.json")) == config
  _assert_same(switchx.load(str(tmp_path / "from_t5x"))[1], params)
  with pytest.raises(ValueError, match="unknown source format 'onnx'"):
    convert(t5x, str(tmp_path / "x"), "onnx", "switchx")
  with pytest.raises(ValueError, match="unknown target format 't5x'"):
    convert(t5x, str(tmp_path / "x"), "hf", "t5x")


def test_semantics_is_validated():
  with pytest.raises(ValueError, match=r"MoeConfig.semantics='hf'.*'switch'.*'transformers'"):
    MoeConfig(semantics="hf")
  with pytest.raises(ValueError, match=r"MoeConfig.expert_capacity=None: semantics='transformers'"):
    MoeConfig(semantics="transformers")
  with pytest.raises(ValueError, match="top-1 in sequence order"):
    MoeConfig(semantics="transformers", expert_capacity=8, top_k=2)

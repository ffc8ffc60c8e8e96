"""transformers interop: switchx reproduces transformers' logits and loss for imported T5 / SwitchTransformers
models, export writes models transformers loads, import(export(x)) is bit-exact, bad checkpoints fail clearly.

Tolerance: float32 logits agree to 1e-5 relative to the largest logit (atol = 1e-5 * max(1, max |logit|)):
torch and XLA sum the same products in different orders, and the rounding error grows with the magnitudes
(tiny random models have logits up to ~20). Routing decisions are discrete and identical.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the interop extra: pip install -e '.[interop]'")
transformers = pytest.importorskip("transformers", reason="needs the interop extra: pip install -e '.[interop]'")
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="needs the interop extra")

from conftest import jitted_apply, tiny_config  # noqa: E402
from random_params import random_params  # noqa: E402
from switchx.config import MoeConfig  # noqa: E402
from switchx.interop import export_hf, import_hf  # noqa: E402
from switchx.interop.hf import transformers_num_sparse_layers, transformers_sparse_layers  # noqa: E402
from switchx.interop.param_tree import flatten  # noqa: E402
from switchx.losses import total_loss  # noqa: E402

BATCH, ENC_LEN, DEC_LEN, VOCAB = 3, 10, 7, 64
TINY = dict(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, decoder_start_token_id=0)

SWITCH_CASES = {  # name: SwitchTransformersConfig fields
    # every other block sparse (step 2), tied + scaled logits, no token dropped
    "e2-step2-tied-relu": dict(num_experts=2, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                               num_sparse_decoder_layers=1, expert_capacity=64),
    # all blocks sparse (step 1), untied logits, tanh gelu
    "e4-step1-untied-gelu": dict(num_experts=4, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=2,
                                 num_sparse_decoder_layers=2, expert_capacity=64, dense_act_fn="gelu_new",
                                 tie_word_embeddings=False),
    # binding capacity: 1 slot per expert per sequence, so most tokens are dropped; tie_word_embeddings (scaled
    # logits) but a separate lm_head, which transformers then leaves untied
    "e8-step2-binding": dict(num_experts=8, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                             num_sparse_decoder_layers=1, expert_capacity=1),
    # 4 encoder blocks at step 2 (blocks 1, 3), 3 decoder blocks all sparse; binding capacity; loss coefficients
    "e4-mixed-binding-silu": dict(num_experts=4, num_layers=4, num_decoder_layers=3, num_sparse_encoder_layers=2,
                                  num_sparse_decoder_layers=3, expert_capacity=2, dense_act_fn="silu",
                                  router_z_loss_coef=0.3, router_aux_loss_coef=0.2),
}
T5_CASES = {  # v1.1 with its separate lm_head, as the released checkpoints
    "t5-v1_1-gated-gelu": dict(num_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5-original-relu": dict(num_layers=2, feed_forward_proj="relu"),
}

SEPARATE_LM_HEAD = ("e8-step2-binding", "t5-v1_1-gated-gelu")


def _build(name: str):
  torch.manual_seed(sum(map(ord, name)))
  if name in SWITCH_CASES:
    model = transformers.SwitchTransformersForConditionalGeneration(
        transformers.SwitchTransformersConfig(**TINY, **SWITCH_CASES[name]))
  else:
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY, **T5_CASES[name]))
  if not model.config.tie_word_embeddings:
    # Untied SwitchTransformers builds separate random encoder / decoder embeddings; checkpoints share one.
    model.encoder.embed_tokens.weight = model.shared.weight
    model.decoder.embed_tokens.weight = model.shared.weight
  if name in SEPARATE_LM_HEAD:
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, TINY["d_model"]))
  return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """name -> (transformers model, its save_pretrained directory), built once for the module."""
  models = {}
  for name in (*SWITCH_CASES, *T5_CASES):
    model = _build(name)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    models[name] = (model, path)
  return models


def _inputs(seed: int = 0):
  """Encoder ids with right padding in row 0, decoder ids starting with 0 (transformers' decoder start)."""
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, VOCAB, (BATCH, ENC_LEN))
  enc[0, 7:] = 0
  dec = rng.randint(2, VOCAB, (BATCH, DEC_LEN))
  dec[:, 0] = 0
  return enc, dec


def _hf_logits(model, enc, dec) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0).long(),
                decoder_input_ids=torch.tensor(dec))
  return out.logits.numpy()


def _assert_close(ours, ref, what: str) -> float:
  diff = float(np.abs(np.asarray(ours) - ref).max())
  assert diff <= 1e-5 * max(1.0, float(np.abs(ref).max())), f"{what}: max |logit diff| {diff}"
  return diff


@pytest.mark.parametrize("name", [*SWITCH_CASES, *T5_CASES])
def test_imported_logits_match_transformers(hf_models, name):
  model, path = hf_models[name]
  config, params = import_hf(path)
  enc, dec = _inputs()
  ours, aux = jitted_apply(config)({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
  _assert_close(ours, _hf_logits(model, enc, dec), name)
  if name in SWITCH_CASES:
    moe = config.moe
    assert moe.semantics == "transformers" and moe.expert_capacity == SWITCH_CASES[name]["expert_capacity"]
    assert moe.jitter_noise == model.config.router_jitter_noise
    assert moe.router_z_loss_coef == model.config.router_z_loss_coef
    assert moe.load_balance_loss_coef == model.config.router_aux_loss_coef
    assert config.logits_via_embedding == (model.config.tie_word_embeddings and name not in SEPARATE_LM_HEAD)
    if "binding" in name:  # the capacity really drops tokens, so dropping is part of what matched
      assert max(float(a["dropped_fraction"]) for a in aux.values()) > 0.2
  else:
    assert not config.is_sparse and config.activation == ("gated-gelu" if "gated" in name else "relu")


def test_placement_follows_transformers(hf_models):
  config, _ = import_hf(hf_models["e4-mixed-binding-silu"][1])
  model = hf_models["e4-mixed-binding-silu"][0]
  for stack, ours in ((model.encoder, config.encoder_sparse_layers),
                      (model.decoder, config.decoder_sparse_layers)):
    assert ours == tuple(i for i, block in enumerate(stack.block) if block.is_sparse)
  assert config.encoder_sparse_layers == (1, 3) and config.decoder_sparse_layers == (0, 1, 2)
  # transformers' rule, including its quirks: num_sparse 0 still makes block 1 sparse; step 0 makes none.
  assert transformers_sparse_layers(4, 2) == (1, 3) and transformers_sparse_layers(4, 3) == (0, 1, 2, 3)
  assert transformers_sparse_layers(3, 0) == (1,) and transformers_sparse_layers(2, 3) == ()
  assert transformers_num_sparse_layers((), 2, "decoder_sparse") == 3
  with pytest.raises(ValueError, match=r"cannot place sparse layers.*\(1, 3\)"):
    transformers_num_sparse_layers((0, 2), 4, "encoder_sparse")


@pytest.mark.parametrize("name", ["e4-mixed-binding-silu", "e2-step2-tied-relu", "e4-step1-untied-gelu"])
def test_total_loss_matches_transformers_loss(hf_models, name):
  model, path = hf_models[name]
  config, params = import_hf(path)
  enc, _ = _inputs(1)
  enc[0, 7:] = 5  # transformers routes padding and counts it in its router losses; no padding keeps them equal
  labels = np.random.RandomState(2).randint(2, VOCAB, (BATCH, DEC_LEN))
  labels[1, 4:] = -100  # ignored by transformers' cross-entropy; target 0 (weight 0) in switchx
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc), labels=torch.tensor(labels), output_router_logits=True)
  dec = model._shift_right(torch.tensor(labels)).numpy()
  logits, aux = jitted_apply(config)({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
  loss, metrics = total_loss(config, logits, aux, {"decoder_target_tokens": jnp.asarray(np.maximum(labels, 0))})
  assert float(loss) == pytest.approx(float(out.loss), rel=1e-6, abs=1e-5)
  router_z = float(out.encoder_z_loss + out.decoder_z_loss)
  balance = float(out.encoder_aux_loss + out.decoder_aux_loss)
  assert float(metrics["router_z_loss"]) == pytest.approx(router_z, rel=1e-5, abs=1e-6)
  assert float(metrics["load_balance_loss"]) == pytest.approx(balance, rel=1e-5, abs=1e-6)
  if name == "e4-step1-untied-gelu":  # transformers skips stacks whose sparse step is 1
    assert router_z == 0 and balance == 0
  if name == "e4-mixed-binding-silu":  # encoder at step 2 counts, the all-sparse decoder does not
    assert float(out.encoder_z_loss) > 0 and float(out.decoder_z_loss) == 0


def _read(path):
  return safetensors_numpy.load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("name", [*SWITCH_CASES, *T5_CASES])
def test_export_import_round_trip_is_bit_exact(hf_models, tmp_path, name):
  config, params = import_hf(hf_models[name][1])
  export_hf(config, params, str(tmp_path))
  again_config, again = import_hf(str(tmp_path))
  assert again_config == config
  flat, flat_again = _flat(params), _flat(again)
  assert flat.keys() == flat_again.keys()
  for key in flat:
    assert flat[key].dtype == np.float32 and np.array_equal(flat[key], flat_again[key]), key
  model, _ = hf_models[name]
  reloaded = type(model).from_pretrained(str(tmp_path)).eval()  # transformers reads our config.json alike
  # from_pretrained leaves the weights in memory-mapped buffers whose alignment differs from freshly allocated
  # ones, and on some CPUs (seen on AMD EPYC) torch's matmul kernels then round differently (2e-6 here, with
  # every tensor bit-identical). Fresh copies make the comparison about the checkpoint, not about alignment.
  with torch.no_grad():
    for parameter in reloaded.parameters():
      parameter.data = parameter.data.clone()
  enc, dec = _inputs()
  np.testing.assert_array_equal(_hf_logits(reloaded, enc, dec), _hf_logits(model, enc, dec))
  original, exported = _read(hf_models[name][1]), _read(str(tmp_path))
  for key, value in original.items():  # every tensor transformers saved comes back bit for bit ...
    if name == "e8-step2-binding" and key == "lm_head.weight":  # ... but a scaled separate lm_head, which
      np.testing.assert_allclose(exported[key], value * TINY["d_model"] ** -0.5, rtol=1e-6)  # import folds
      assert json.load(open(tmp_path / "config.json"))["tie_word_embeddings"] is False
    else:
      assert np.array_equal(exported[key], value), key


def _flat(params):
  return {k: np.asarray(v) for k, v in flatten(params).items()}


NATIVE = {  # switchx configs exported to transformers
    "switch-binding-untied": tiny_config(
        activation="relu", logits_via_embedding=False, encoder_sparse="every:2", decoder_sparse="all",
        moe=MoeConfig(num_experts=4, semantics="transformers", expert_capacity=3)),
    "t5-gated-untied": tiny_config(activation="gated-gelu", logits_via_embedding=False),
}


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_exported_switchx_model_loads_in_transformers(tmp_path, name):
  config = NATIVE[name]
  params = random_params(config, seed=3)
  export_hf(config, params, str(tmp_path))
  hf_config = json.load(open(tmp_path / "config.json"))
  cls = (transformers.SwitchTransformersForConditionalGeneration if config.is_sparse
         else transformers.T5ForConditionalGeneration)
  assert hf_config["architectures"] == [cls.__name__]
  model = cls.from_pretrained(str(tmp_path)).eval()
  enc, dec = _inputs(4)
  ours, _ = jitted_apply(config)({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
  _assert_close(ours, _hf_logits(model, enc, dec), name)
  again_config, again = import_hf(str(tmp_path))
  if config.is_sparse:  # layouts come back as explicit layer indices
    config = config.replace(encoder_sparse=config.encoder_sparse_layers,
                            decoder_sparse=config.decoder_sparse_layers)
  assert again_config == config
  assert all(np.array_equal(v, _flat(again)[k]) for k, v in _flat(params).items())


def test_pytorch_model_bin_reads_like_safetensors(hf_models, tmp_path):
  model, path = hf_models["e2-step2-tied-relu"]
  with open(os.path.join(path, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # holds lm_head and embed_tokens aliases too
  config, params = import_hf(str(tmp_path))
  ref_config, ref = import_hf(path)
  assert config == ref_config
  assert all(np.array_equal(v, _flat(params)[k]) for k, v in _flat(ref).items())


# --- bad input ----------------------------------------------------------------------------------------------
def _copy_with(hf_path, dst, edit=None, config_edit=None):
  tensors = _read(hf_path)
  if edit:
    edit(tensors)
  hf = json.load(open(os.path.join(hf_path, "config.json")))
  if config_edit:
    config_edit(hf)
  os.makedirs(dst, exist_ok=True)
  json.dump(hf, open(os.path.join(dst, "config.json"), "w"))
  safetensors_numpy.save_file(tensors, os.path.join(dst, "model.safetensors"))
  return str(dst)


def test_not_a_model_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    import_hf(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    import_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
  with pytest.raises(ValueError, match="model_type 'bert' is not supported.*'t5'.*'switch_transformers'"):
    import_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5EncoderModel"]}))
  with pytest.raises(ValueError, match="T5EncoderModel.*T5ForConditionalGeneration"):
    import_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
  with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
    import_hf(str(tmp_path))


def test_bad_tensors_fail_naming_them(hf_models, tmp_path):
  src = hf_models["e4-mixed-binding-silu"][1]
  q = "encoder.block.1.layer.0.SelfAttention.q.weight"

  def wrong_shape(t):
    t[q] = np.zeros((16, 8), np.float32)

  with pytest.raises(ValueError, match=rf"{q} has shape \(16, 8\), config.json implies \(16, 16\)"):
    import_hf(_copy_with(src, tmp_path / "shape", wrong_shape))

  def extra(t):
    t["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros((2, 2), np.float32)

  with pytest.raises(ValueError, match=r"unexpected tensors: encoder\.block\.0\.layer\.0\.SelfAttention\.extra"):
    import_hf(_copy_with(src, tmp_path / "extra", extra))

  expert = "decoder.block.2.layer.2.mlp.experts.expert_3.wo.weight"
  with pytest.raises(ValueError, match=rf"missing tensors: {expert}"):
    import_hf(_copy_with(src, tmp_path / "missing", lambda t: t.pop(expert)))

  # the config says 8 experts but the weights hold 4: every expert_4..7 tensor is missing
  with pytest.raises(ValueError, match=r"missing tensors: .*expert_7"):
    import_hf(_copy_with(src, tmp_path / "experts", config_edit=lambda c: c.update(num_experts=8)))

  with pytest.raises(ValueError, match=r"activation 'gelu' is not supported.*gelu_new"):
    import_hf(_copy_with(hf_models["t5-original-relu"][1], tmp_path / "gelu",
                         config_edit=lambda c: c.update(feed_forward_proj="gelu")))


def test_export_refuses_what_transformers_cannot_represent(tmp_path):
  moe = MoeConfig(num_experts=2, semantics="transformers", expert_capacity=4)
  cases = [
      (tiny_config(activation="gated-gelu", encoder_sparse="every:2", moe=moe), "no gated feed-forward"),
      (tiny_config(activation="relu", encoder_sparse=(0,), moe=moe),
       r"cannot place sparse layers there.*\[\(\), \(0, 1\), \(1,\)\]"),
      (tiny_config(activation="relu", encoder_sparse="all", moe=MoeConfig(num_experts=2)), "expert_capacity"),
      (tiny_config(activation="relu", encoder_sparse="all", moe=MoeConfig(num_experts=2, top_k=2)), "top-1"),
  ]
  for config, message in cases:
    with pytest.raises(ValueError, match=message):
      export_hf(config, {}, str(tmp_path / "out"))  # refused before the params are looked at
    assert not (tmp_path / "out" / "model.safetensors").exists()  # nothing written

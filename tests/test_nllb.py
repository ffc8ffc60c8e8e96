"""NLLB-MoE as a variant of the encoder-decoder (interop/hf_nllb.py): logits parity with transformers'
NllbMoeForConditionalGeneration on random tiny models (padding, a router that would overflow any capacity, both
gate normalisations), directory import / export round trips, the 54.5B preset's size, the variant's pieces
(renormalising the kept gates, expert biases on every dispatch path, sinusoidal positions through the decoding
cache), training on the built-in corpus, and clear errors."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import save_load_round_trip
from random_params import random_params
from switchx.config import DecodeConfig, ModelConfig, MoeConfig
from switchx.interop import hf_nllb
from switchx.models.encoder_decoder import EncoderDecoder

VOCAB = 99


def _torch():
  torch = pytest.importorskip("torch", reason="needs the interop extra: pip install -e '.[interop]'")
  transformers = pytest.importorskip("transformers", reason="needs the interop extra")
  return torch, transformers


@pytest.fixture
def fixed_transformers(monkeypatch):
  """transformers with NllbMoeExperts' loop as the model defines it. transformers 5.x one-hots the (already
  one-hot) top-1 mask, so every token's first choice runs through expert 1 and its second through expert 0;
  4.x, fairseq and switchx run each token through the experts it chose. The loop below is 4.x's."""
  torch, transformers = _torch()
  from transformers.models.nllb_moe import modeling_nllb_moe

  def forward(self, hidden_states, router_mask, router_probs):
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
      rows = torch.nonzero(router_probs[:, e] > 0).flatten()
      if len(rows):
        y = self[f"expert_{e}"](hidden_states[rows]) * router_probs[rows, e, None]
        if self.moe_token_dropout > 0:
          y = self.token_dropout(y) if self.training else y * (1 - self.moe_token_dropout)
        out.index_add_(0, rows, y.to(hidden_states.dtype))
    return out

  monkeypatch.setattr(modeling_nllb_moe.NllbMoeExperts, "forward", forward)
  return torch, transformers


def _hf_model(torch, transformers, seed=0, skew_router=False, **changes):
  settings = dict(vocab_size=VOCAB, d_model=32, encoder_layers=4, decoder_layers=4, encoder_ffn_dim=48,
                  decoder_ffn_dim=48, encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4,
                  encoder_sparse_step=2, decoder_sparse_step=2, max_position_embeddings=64, dropout=0.0,
                  attention_dropout=0.0)
  settings.update(changes)
  torch.manual_seed(seed)
  model = transformers.NllbMoeForConditionalGeneration(transformers.NllbMoeConfig(**settings)).eval()
  with torch.no_grad():   # widen the small default init; norms and biases random too, so every one is checked
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
      else:
        p.normal_(0.0, 0.2 if name.endswith("bias") else 0.3)
      if skew_router and "router.classifier" in name:   # expert 0 wins nearly every token's first choice
        p[0] += 3.0 * p.new_ones(p.shape[1])
  return model


def _ids(seed, batch, length, pad_from=None):
  ids = np.random.RandomState(seed).randint(3, VOCAB, (batch, length))
  if pad_from is not None:
    ids[0, pad_from:] = 1                                 # NLLB pads with 1
  return ids


def _ours(config, params, enc, dec):
  """switchx logits in NLLB's id space: inputs swapped into switchx's ids, logits' columns swapped back."""
  logits, aux = EncoderDecoder(config).apply({"params": params}, jnp.asarray(hf_nllb.swap_ids(enc), jnp.int32),
                                             jnp.asarray(hf_nllb.swap_ids(dec), jnp.int32))
  return np.asarray(logits)[..., hf_nllb.swap_ids(np.arange(config.vocab_size))], aux


@pytest.mark.parametrize("case", ["padded", "every_layer_skewed", "normalise_before_dropping"])
def test_logits_match_transformers_nllb_moe(fixed_transformers, case):
  torch, transformers = fixed_transformers
  changes = {"padded": {}, "every_layer_skewed": dict(encoder_sparse_step=1, decoder_sparse_step=1, num_experts=3,
                                                      scale_embedding=False),
             "normalise_before_dropping": dict(normalize_router_prob_before_dropping=True, moe_token_dropout=0.1)}
  model = _hf_model(torch, transformers, seed=1, skew_router=case == "every_layer_skewed", **changes[case])
  config, params = hf_nllb.from_hf(model.config, model.state_dict())
  enc, dec = _ids(2, 3, 11, pad_from=7 if case == "padded" else None), _ids(3, 3, 6)
  dec[:, 0] = 2                                           # NLLB starts the decoder with </s>
  mask = torch.from_numpy((enc != 1).astype(np.int64))
  with torch.no_grad():
    expected = model(input_ids=torch.from_numpy(enc), attention_mask=mask,
                     decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
  ours, aux = _ours(config, params, enc, dec)
  assert np.abs(expected).max() > 1.0                     # not a near-constant output
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
  if case == "every_layer_skewed":   # a capacity would drop tokens here; eval has none, as transformers'
    usage = np.asarray(aux["encoder/layers_0"]["expert_usage"])
    assert usage.max() > 0.45 and float(aux["encoder/layers_0"]["dropped_fraction"]) == 0.0
    trained = config.replace(moe=dataclasses.replace(config.moe, eval_capacity_factor=0.5))
    _, capped = _ours(trained, params, enc, dec)
    assert float(capped["encoder/layers_0"]["dropped_fraction"]) > 0.1


def test_directories_import_export_and_round_trip(fixed_transformers, tmp_path):
  """save_pretrained -> switchx.load gives transformers' logits; `switchx convert --to hf` ->
  from_pretrained gives switchx's; switchx.save / load is bit-exact."""
  torch, transformers = fixed_transformers
  from switchx import api, cli
  model = _hf_model(torch, transformers, seed=4)
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  enc, dec = _ids(5, 2, 9), _ids(6, 2, 5)
  with torch.no_grad():
    expected = model(input_ids=torch.from_numpy(enc), decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
  config, params = api.load(str(tmp_path / "hf"))
  assert config.position_embedding == "sinusoidal" and config.moe.normalize_kept_gates
  np.testing.assert_allclose(_ours(config, params, enc, dec)[0], expected, atol=1e-4, rtol=0)

  save_load_round_trip(config, params, tmp_path / "switchx")

  assert cli.main(["convert", "--from", "switchx", "--to", "hf", str(tmp_path / "switchx"),
                   str(tmp_path / "exported")]) == 0
  reloaded, info = transformers.NllbMoeForConditionalGeneration.from_pretrained(str(tmp_path / "exported"),
                                                                                 output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  with torch.no_grad():
    again = reloaded.eval()(input_ids=torch.from_numpy(enc), decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
  np.testing.assert_allclose(again, expected, atol=1e-4, rtol=0)


def test_a_switchx_nllb_model_exports_to_transformers(fixed_transformers, tmp_path):
  """The other direction: a model switchx initialised (the tiny preset's shape) -> from_pretrained -> the same
  logits."""
  torch, transformers = fixed_transformers
  from switchx import gin_config
  gin_config.parse(["models/nllb_moe_tiny"], ["ModelConfig.vocab_size=120", "ModelConfig.num_encoder_layers=2",
                                              "ModelConfig.num_decoder_layers=2"])
  config = gin_config.model_config()
  params = random_params(config, seed=7)
  hf_nllb.export_dir(config, params, str(tmp_path))
  model = transformers.NllbMoeForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  enc, dec = _ids(8, 2, 10), _ids(9, 2, 4)
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(enc), decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
  np.testing.assert_allclose(_ours(config, params, enc, dec)[0], theirs, atol=1e-4, rtol=0)


def test_preset_size_matches_the_published_54_5b():
  from switchx import gin_config, model_stats
  gin_config.parse(["models/nllb_moe_54b"])
  total = model_stats.param_counts(gin_config.model_config())["total_params"]
  assert abs(total / 54.5e9 - 1) < 0.01, total


def test_renormalising_the_kept_gates_by_hand():
  """Top-2 over 4 experts, capacity 1: token 0 keeps both choices (gates renormalised over the two), token 1's
  first choice is full (token 0 took it) so its second alone carries gate 1; normalize_gates alone would give it
  its share of the two, as GShard."""
  from switchx.moe.routing import tokens_choose
  probs = jnp.asarray([[[0.5, 0.3, 0.1, 0.1], [0.6, 0.1, 0.2, 0.1]]])        # [G=1, S=2, E=4]
  mask = jnp.ones((1, 2), bool)
  kept = tokens_choose(probs, mask, k=2, capacity=1, normalize_gates=True, normalize_kept_gates=True)
  np.testing.assert_array_equal(np.asarray(kept.kept), [[[True, True], [False, True]]])
  np.testing.assert_allclose(np.asarray(kept.gate), [[[0.5 / 0.8, 0.3 / 0.8], [0.0, 1.0]]], rtol=1e-6)
  shared = tokens_choose(probs, mask, k=2, capacity=1, normalize_gates=True)
  np.testing.assert_allclose(np.asarray(shared.gate), [[[0.5 / 0.8, 0.3 / 0.8], [0.0, 0.2 / 0.8]]], rtol=1e-6)


@pytest.mark.parametrize("dispatch", ["einsum", "index", "dropless", "ragged"])
def test_expert_biases_give_the_same_outputs_and_gradients_on_every_dispatch_path(dispatch):
  """An MoE layer with expert biases, kept-gate renormalisation and expert output masking (eval scale): every
  dispatch path equals the einsum path with no capacity in outputs and in every parameter's gradient."""
  from switchx.moe.layer import MoeLayer
  def layer(path):
    moe = MoeConfig(num_experts=4, top_k=2, normalize_gates=True, normalize_kept_gates=True, dispatch=path,
                    train_capacity_factor=0.0, eval_capacity_factor=0.0, expert_output_dropout=0.2, group_size=16)
    return MoeLayer(moe, d_ff=12, activation="relu", use_bias=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 6))
  mask = jnp.ones((2, 8), bool).at[1, 6:].set(False)
  params = nn.unbox(layer("einsum").init(jax.random.PRNGKey(1), x, mask, False)["params"])
  params = jax.tree_util.tree_map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  assert params["experts"]["wi_bias"].shape == (4, 12) and params["experts"]["wo_bias"].shape == (4, 6)

  def loss(p, path):
    y, _ = layer(path).apply({"params": p}, x, mask, False)
    return jnp.sum(jnp.sin(y)), y
  (_, expected), grads = jax.value_and_grad(loss, has_aux=True)(params, "einsum")
  (_, got), other = jax.value_and_grad(loss, has_aux=True)(params, dispatch)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(other), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert float(jnp.abs(grads["experts"]["wo_bias"]).sum()) > 0


def test_cached_decoding_with_sinusoidal_positions_equals_recomputing():
  """The decoding cache reads each step's sinusoid at its position: greedy tokens and logits equal re-running
  the whole decoder each step (no-drop routing, as decoding uses)."""
  from test_decode import _recompute_greedy
  from switchx.decode import decoding_config, generate
  from switchx import gin_config
  gin_config.parse(["models/nllb_moe_tiny"], ["ModelConfig.vocab_size=80", "ModelConfig.num_encoder_layers=2",
                                              "ModelConfig.num_decoder_layers=2", "ModelConfig.d_model=32",
                                              "ModelConfig.d_ff=48"])
  config = gin_config.model_config()
  params = jax.tree_util.tree_map(jnp.asarray, random_params(config, seed=3))
  enc = np.random.RandomState(4).randint(2, 80, (2, 7)).astype(np.int32)
  enc[1, 5:] = 0
  result = generate(config, params, jnp.asarray(enc), DecodeConfig(max_decode_length=6), return_logits=True)
  tokens, logits = _recompute_greedy(decoding_config(config), params, jnp.asarray(enc), 6)
  np.testing.assert_array_equal(np.asarray(result.tokens), tokens)
  np.testing.assert_allclose(np.asarray(result.logits), logits, atol=2e-5, rtol=1e-5)
  assert np.abs(np.diff(logits, axis=1)).max() > 0.1        # each step's logits differ: positions matter


def test_switchx_train_trains_the_tiny_nllb_preset_on_the_builtin_corpus(tmp_path):
  from switchx import cli
  from switchx.train.metrics import read_metrics
  flags = ["train", "--gin_file", "nllb_moe_tiny", "--model_dir", str(tmp_path),
           "--gin.TrainConfig.num_train_steps=60", "--gin.TrainConfig.eval_every=10", "--gin.TrainConfig.batch_size=8",
           "--gin.TrainConfig.inputs_length=48", "--gin.TrainConfig.targets_length=16",
           "--gin.TrainConfig.eval_batches=2", "--gin.TrainConfig.log_every=30",
           "--gin.TrainConfig.learning_rate=0.003", "--gin.TrainConfig.optimizer='adamw'"]
  assert cli.main(flags) == 0
  held_out = [r["eval/cross_entropy_loss"] for r in read_metrics(tmp_path) if "eval/cross_entropy_loss" in r]
  assert len(held_out) == 6 and held_out[-1] < held_out[0] - 0.5 and held_out[-1] < np.log(2112) - 2, held_out


def test_what_nllb_cannot_represent_fails_clearly(tmp_path):
  import types
  hf = types.SimpleNamespace(**{**hf_nllb.DEFAULTS, "activation_function": "gelu", "second_expert_policy": "random"})
  with pytest.raises(ValueError, match="activation_function 'relu'.*second_expert_policy 'all'"):
    hf_nllb.nllb_config(hf)
  t5 = ModelConfig(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1,
                   num_decoder_layers=1, activation="relu")
  with pytest.raises(ValueError, match="position_embedding='sinusoidal'"):
    hf_nllb.export_dir(t5, random_params(t5), str(tmp_path / "nllb"))
  from switchx.interop.hf import export_hf
  nllb = t5.replace(position_embedding="sinusoidal", norm="layer", use_bias=True)
  with pytest.raises(ValueError, match="NllbMoeForConditionalGeneration"):
    export_hf(nllb, random_params(nllb), str(tmp_path / "t5"))
  with pytest.raises(ValueError, match="position_embedding"):
    t5.replace(position_embedding="rotary")
  with pytest.raises(ValueError, match="d_model >= 4"):
    t5.replace(position_embedding="sinusoidal", d_model=2, head_dim=1)
  assert not (tmp_path / "nllb").exists() and not (tmp_path / "t5").exists()

"""The decoder-only MoE model (models/decoder_only.py): rotary positions, causality and packing, the MoE layer on
every dispatch path, logits parity with transformers' MixtralForCausalLM, and a loss that falls."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import save_load_round_trip
from switchx.config import DecoderOnlyConfig, MoeConfig
from switchx.models.decoder_only import DecoderOnly
from switchx.nn.rotary import rotary


def test_rotary_dot_products_depend_on_relative_position_only():
  """q at position p and k at p': <rot(q, p), rot(k, p')> is a function of p - p' (and rotation keeps norms);
  with Dh = 2 the rotation is the hand-written 2-D one by angle p."""
  rng = np.random.RandomState(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))
  dot = lambda p, pk: float(jnp.sum(rotary(q, jnp.asarray([[p]]), 100.0) * rotary(k, jnp.asarray([[pk]]), 100.0)))
  assert dot(3, 1) == pytest.approx(dot(10, 8), abs=1e-5) == pytest.approx(dot(2, 0), abs=1e-5)
  assert abs(dot(3, 1) - dot(3, 2)) > 1e-3
  np.testing.assert_allclose(np.linalg.norm(rotary(q, jnp.asarray([[7]]), 100.0)), np.linalg.norm(q), rtol=1e-6)
  x = jnp.asarray([[[[1.0, 0.0]]]])
  np.testing.assert_allclose(rotary(x, jnp.asarray([[0.5]]), 1.0)[0, 0, 0], [np.cos(0.5), np.sin(0.5)], atol=1e-6)


def tiny(**changes) -> DecoderOnlyConfig:
  moe = changes.pop("moe", MoeConfig(num_experts=4, top_k=2, normalize_gates=True, dispatch="dropless",
                                     train_capacity_factor=0.0, eval_capacity_factor=0.0))
  base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, moe=moe)
  return DecoderOnlyConfig(**{**base, **changes})


@functools.lru_cache(maxsize=None)
def _apply(config):
  return jax.jit(lambda params, tokens, seg, pos: DecoderOnly(config).apply({"params": params}, tokens, seg, pos)[0])


def _params(config, seed=0):
  tokens = jnp.ones((1, 4), jnp.int32)
  return nn.unbox(DecoderOnly(config).init(jax.random.PRNGKey(seed), tokens)["params"])


def test_causal_and_packed_rows_see_only_their_own_past():
  """Changing a later token leaves every earlier logit unchanged; two sequences packed in one row (segment ids,
  positions restarting at 0) give each one's logits as if run alone. Nothing is dropped (dropless dispatch)."""
  config = tiny()
  params = _params(config)
  run = lambda tokens, seg=None, pos=None: np.asarray(_apply(config)(params, jnp.asarray(tokens), seg, pos))
  a = np.asarray([[5, 9, 3, 7, 11, 2]], np.int32)
  b = a.copy()
  b[0, 4] = 30
  la, lb = run(a), run(b)
  np.testing.assert_allclose(la[:, :4], lb[:, :4], atol=1e-6)
  assert np.abs(la[:, 4:] - lb[:, 4:]).max() > 1e-4
  first, second = np.asarray([[5, 9, 3]], np.int32), np.asarray([[7, 11, 2, 8]], np.int32)
  packed = np.concatenate([first, second, [[0]]], 1)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0]])
  pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0]])
  together = run(packed, seg, pos)
  np.testing.assert_allclose(together[:, :3], run(first), atol=2e-5)
  np.testing.assert_allclose(together[:, 3:7], run(second), atol=2e-5)


@pytest.mark.parametrize("dispatch", ["einsum", "index"])
def test_every_dispatch_path_gives_the_dropless_answer_when_nothing_is_dropped(dispatch):
  config = tiny()
  other = tiny(moe=MoeConfig(num_experts=4, top_k=2, normalize_gates=True, dispatch=dispatch,
                             train_capacity_factor=0.0, eval_capacity_factor=0.0))
  params = _params(config)
  tokens = jnp.asarray(np.random.RandomState(1).randint(1, 64, (2, 9)), jnp.int32)
  np.testing.assert_allclose(_apply(other)(params, tokens, None, None), _apply(config)(params, tokens, None, None),
                             atol=1e-5)


def _mixtral(seed, **changes):
  torch = pytest.importorskip("torch", reason="needs the interop extra: pip install -e '.[interop]'")
  transformers = pytest.importorskip("transformers", reason="needs the interop extra")
  settings = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False)
  settings.update(changes)
  torch.manual_seed(seed)
  model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**settings)).eval()
  with torch.no_grad():   # the default init is small (std 0.02): widen it so that routing and attention matter
    for name, p in model.named_parameters():
      if "norm" not in name:
        p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
  return torch, model


FAMILY_SETTINGS = {   # tiny random models of each family, with the features that set it apart switched on
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(num_experts=6, num_experts_per_tok=3, norm_topk_prob=False)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, decoder_sparse_step=1, mlp_only_layers=[0], use_sliding_window=False)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        num_experts=8, num_experts_per_tok=4, norm_topk_prob=True, moe_intermediate_size=20, head_dim=12,
        decoder_sparse_step=2, mlp_only_layers=[], use_sliding_window=False, num_hidden_layers=4)),
}


def _family(name, seed):
  torch = pytest.importorskip("torch", reason="needs the interop extra: pip install -e '.[interop]'")
  transformers = pytest.importorskip("transformers", reason="needs the interop extra")
  model_cls, config_cls, extra = FAMILY_SETTINGS[name]
  settings = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
  settings.update(extra)
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**settings)).eval()
  with torch.no_grad():   # widen the small default init; norm scales and biases random too, so they are checked
    for pname, p in model.named_parameters():
      p.normal_(1.0 if "norm" in pname else 0.0, 0.2 if ("norm" in pname or "bias" in pname) else 0.3)
  return torch, model


@pytest.mark.parametrize("family", list(FAMILY_SETTINGS))
def test_logits_match_transformers_olmoe_and_qwen_moe(family):
  """OLMoE (query / key RMSNorm over all heads, top-3 of 6 unnormalised), Qwen1.5-MoE (q/k/v biases, a gated
  shared expert, a dense first layer, top-2 unnormalised), Qwen3-MoE (per-head query / key RMSNorm, head_dim
  12 != d_model / heads, every other layer sparse, top-4 normalised): float32 logits within 1e-4."""
  from switchx.interop.hf_decoder import from_hf
  torch, model = _family(family, 4)
  tokens = np.random.RandomState(4).randint(1, 96, (2, 10)).astype(np.int64)
  with torch.no_grad():
    expected = model(torch.from_numpy(tokens)).logits.numpy()
  config, params = from_hf(model.config, model.state_dict())
  got = np.asarray(_apply(config)(params, jnp.asarray(tokens, jnp.int32), None, None))
  assert np.abs(expected).max() > 1.0
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed,changes", [(0, {}), (1, dict(num_key_value_heads=1, num_experts_per_tok=1)),
                                          (2, dict(num_key_value_heads=4, tie_word_embeddings=True))])
def test_logits_match_transformers_mixtral(seed, changes):
  """Random tiny MixtralForCausalLM models (grouped-query, multi-query and plain multi-head attention; top-2 and
  top-1; tied embeddings), float32: switchx's logits within 1e-4 of transformers'. Mixtral routes every token
  (no capacity); the same configs under a Switch capacity of 1.0 would drop tokens (checked below), which is why
  the import sets dispatch='dropless'."""
  from switchx.interop.hf_decoder import from_hf
  torch, model = _mixtral(seed, **changes)
  tokens = np.random.RandomState(seed).randint(1, 96, (2, 11)).astype(np.int64)
  with torch.no_grad():
    expected = model(torch.from_numpy(tokens)).logits.numpy()
  config, params = from_hf(model.config, model.state_dict())
  got = np.asarray(_apply(config)(params, jnp.asarray(tokens, jnp.int32), None, None))
  assert np.abs(expected).max() > 1.0                              # logits far from zero: a real comparison
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  capped = config.replace(moe=MoeConfig(**{**config.moe.__dict__, "dispatch": "einsum",
                                           "eval_capacity_factor": 1.0, "min_capacity": 1}))
  dropped = np.asarray(_apply(capped)(params, jnp.asarray(tokens, jnp.int32), None, None))
  assert np.abs(dropped - expected).max() > 1e-3                   # with a capacity some tokens would be dropped


def test_a_tiny_decoder_only_moe_learns_next_tokens():
  """Causal-LM training (next-token cross-entropy over real tokens + the balance loss) on a fixed set of
  sequences: the loss falls by more than half in 150 AdamW steps."""
  config = tiny(moe=MoeConfig(num_experts=4, top_k=2, normalize_gates=True, dispatch="dropless",
                              train_capacity_factor=0.0, eval_capacity_factor=0.0, load_balance_loss_coef=0.01))
  model = DecoderOnly(config)
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, 64, (8, 16)), jnp.int32)
  params = _params(config)
  tx = optax.adamw(3e-3)
  state = tx.init(params)

  def loss_fn(params):
    logits, aux = model.apply({"params": params}, tokens[:, :-1], train=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + 0.01 * sum(a["load_balance_loss"] for a in aux.values()), ce

  @jax.jit
  def step(params, state):
    (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, ce

  losses = []
  for _ in range(150):
    params, state, ce = step(params, state)
    losses.append(float(ce))
  assert losses[0] > 3.5 and losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("changes,field", [(dict(num_kv_heads=3), "num_kv_heads"), (dict(head_dim=7), "head_dim"),
                                           (dict(moe=MoeConfig(router="experts_choose")), "router")])
def test_bad_decoder_only_config_names_the_field(changes, field):
  with pytest.raises(ValueError, match=field):
    tiny(**changes)


# Published sizes (billions): total, active per token, and how many decimals the active figure was given with.
PUBLISHED = {"mixtral_8x7b": (46.7, 12.9), "mixtral_8x22b": (141.0, 39.0), "olmoe_1b_7b": (6.9, 1.3),
             "qwen1_5_moe_a2_7b": (14.3, 2.7), "qwen3_30b_a3b": (30.5, 3.3)}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_parameter_counts_match_the_published_sizes(preset):
  """From shapes alone (jax.eval_shape). Totals within 1%. Actives within 1% or within the rounding of the
  published figure (OLMoE's 1.28B is published as 1.3B); Qwen3-30B-A3B's active count is 3.35B by this count
  (attention 0.91B + 8 of 128 experts 1.81B + routers 0.01B + embedding and output matrices 0.62B), which Qwen
  publishes as 3.3B: held to 3.35B here, 1.6% above the published figure."""
  from switchx import gin_config, model_stats
  gin_config.parse([f"models/{preset}"])
  config = gin_config.model_config()
  assert isinstance(config, DecoderOnlyConfig)
  counts = model_stats.param_counts(config)
  total, active = counts["total_params"] / 1e9, counts["active_params"] / 1e9
  published_total, published_active = PUBLISHED[preset]
  assert abs(total - published_total) <= 0.01 * published_total, total
  if preset == "qwen3_30b_a3b":
    assert active == pytest.approx(3.353, abs=0.005)
  else:
    assert abs(active - published_active) <= max(0.01 * published_active, 0.05), active


def test_tiny_preset_builds_and_runs():
  from switchx import gin_config
  gin_config.parse(["models/mixtral_tiny"])
  config = gin_config.model_config()
  params = _params(config)
  logits = _apply(config)(params, jnp.ones((2, 5), jnp.int32), None, None)
  assert logits.shape == (2, 5, config.vocab_size) and np.isfinite(np.asarray(logits)).all()


def test_mixtral_directories_import_export_and_round_trip(tmp_path):
  """save_pretrained -> switchx.load gives transformers' logits; switchx convert --to hf -> from_pretrained gives
  switchx's logits; switchx.save / load of a decoder-only model is bit-exact."""
  from switchx import api
  torch, model = _mixtral(3)
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  tokens = np.random.RandomState(3).randint(1, 96, (2, 9)).astype(np.int64)
  with torch.no_grad():
    expected = model(torch.from_numpy(tokens)).logits.numpy()
  config, params = api.load(str(tmp_path / "hf"))
  assert isinstance(config, DecoderOnlyConfig)
  ours = np.asarray(_apply(config)(params, jnp.asarray(tokens, jnp.int32), None, None))
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

  save_load_round_trip(config, params, tmp_path / "switchx")

  from switchx import cli
  assert cli.main(["convert", "--from", "switchx", "--to", "hf", str(tmp_path / "switchx"),
                   str(tmp_path / "exported")]) == 0
  import transformers
  reloaded = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()
  with torch.no_grad():
    again = reloaded(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(again, ours, atol=1e-4, rtol=0)


def test_cached_decoding_equals_recomputing_the_whole_prefix():
  """Greedy decoding through the cache (the prompt read at once, then a token a step) gives the tokens and
  logits of re-running the whole model on prompt + output so far at every step; beam search with one beam and
  no length penalty is greedy; sampling runs and stays in the vocabulary. A grouped-query, MoE model."""
  from switchx.config import DecodeConfig
  from switchx.decode import generate
  config = tiny()
  params = _params(config, seed=1)
  prompt = np.random.RandomState(5).randint(2, 64, (2, 5)).astype(np.int32)
  steps = 6
  result = generate(config, params, prompt, DecodeConfig(strategy="greedy", max_decode_length=steps),
                    return_logits=True)
  sequence, expected_logits = prompt.copy(), []
  for _ in range(steps):
    logits = np.asarray(_apply(config)(params, jnp.asarray(sequence), None, None))[:, -1]   # [B, V]
    expected_logits.append(logits)
    sequence = np.concatenate([sequence, logits.argmax(-1)[:, None].astype(np.int32)], 1)
  np.testing.assert_array_equal(np.asarray(result.tokens), sequence[:, prompt.shape[1]:])
  np.testing.assert_allclose(np.asarray(result.logits), np.stack(expected_logits, 1), atol=1e-4)
  beam = generate(config, params, prompt, DecodeConfig(strategy="beam", beam_size=1, length_penalty=0.0,
                                                       max_decode_length=steps))
  np.testing.assert_array_equal(np.asarray(beam.tokens), np.asarray(result.tokens))
  sampled = generate(config, params, prompt, DecodeConfig(strategy="sample", temperature=1.0,
                                                          max_decode_length=steps))
  assert sampled.tokens.shape == (2, steps) and int(np.asarray(sampled.tokens).max()) < config.vocab_size
  with pytest.raises(ValueError, match="no 0 = padding"):
    generate(config, params, np.asarray([[3, 0, 4]]), DecodeConfig(strategy="greedy"))


def test_switchx_train_trains_a_decoder_only_moe_on_the_builtin_corpus_and_resumes(tmp_path, capsys):
  """`switchx train --gin_file mixtral_tiny` on the built-in corpus (causal-LM batches): the held-out loss falls
  from its first evaluation to its last, and a second run of the same command finds the run finished."""
  from switchx import cli
  from switchx.train.metrics import read_metrics
  flags = ["train", "--gin_file", "mixtral_tiny", "--model_dir", str(tmp_path), "--gin.TrainConfig.num_train_steps=60",
           "--gin.TrainConfig.eval_every=20", "--gin.TrainConfig.batch_size=8", "--gin.TrainConfig.inputs_length=48",
           "--gin.TrainConfig.targets_length=16", "--gin.TrainConfig.eval_batches=2", "--gin.TrainConfig.log_every=20"]
  assert cli.main(flags) == 0
  held_out = [r["eval/cross_entropy_loss"] for r in read_metrics(tmp_path) if "eval/cross_entropy_loss" in r]
  assert len(held_out) == 3 and held_out[-1] < held_out[0] - 0.3, held_out
  logged = [r for r in read_metrics(tmp_path) if "loss" in r][-1]
  assert "router/decoder/layers_0/load_cv" in logged
  assert cli.main(flags) == 0
  assert "already trained" in capsys.readouterr().out


@pytest.mark.parametrize("family", list(FAMILY_SETTINGS))
def test_other_families_export_and_load_back_in_transformers(family, tmp_path):
  """OLMoE, Qwen1.5-MoE and Qwen3-MoE: switchx's parameters exported (`switchx convert --to hf`) load with
  from_pretrained into the same family and give switchx's logits."""
  import transformers
  from switchx import api
  from switchx.interop.hf_decoder import export_dir, from_hf
  torch, model = _family(family, 6)
  config, params = from_hf(model.config, model.state_dict())
  export_dir(config, params, str(tmp_path))
  reloaded = getattr(transformers, FAMILY_SETTINGS[family][0]).from_pretrained(str(tmp_path)).eval()
  tokens = np.random.RandomState(6).randint(1, 96, (2, 9)).astype(np.int64)
  with torch.no_grad():
    again = reloaded(torch.from_numpy(tokens)).logits.numpy()
  ours = np.asarray(_apply(config)(params, jnp.asarray(tokens, jnp.int32), None, None))
  np.testing.assert_allclose(again, ours, atol=1e-4, rtol=0)
  config2, _ = api.load(str(tmp_path))
  assert config2 == config


def test_plan_sizes_a_decoder_only_preset_on_a_mesh():
  """Mixtral-8x7B on data=8 x expert=8: each device holds an eighth of the experts and all of the rest
  (float32), from shapes alone."""
  from switchx import gin_config, model_stats
  from switchx.train.plan import plan
  gin_config.parse(["models/mixtral_8x7b"], ["TrainConfig.batch_size=64"])
  config, train = gin_config.model_config(), gin_config.train_config()
  result = plan(config, train, {"data": 8, "expert": 8, "model": 1})
  counts = model_stats.param_counts(config)
  expert, rest = counts["expert_params"], counts["total_params"] - counts["expert_params"]
  assert result["params_bytes"] == 4 * (expert // 8 + rest)
  assert result["total_params"] == counts["total_params"] and result["activation_bytes"] > 0

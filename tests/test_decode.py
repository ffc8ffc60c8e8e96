"""Decoding with the key/value cache: the same tokens and logits as recomputing the whole sequence each step
(a model with dense and MoE layers; MoE capacity binding and not), beam search and sampling against greedy, batch
independence under no-drop routing, beam scores against a teacher-forced rescoring, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jitted_apply, tiny_switch_config
from random_params import random_params
from switchx.config import DecodeConfig
from switchx.decode import EOS_ID, decoding_config, generate, length_penalty, serving_params

LENGTH = 6
# One sparse encoder layer and two decoder layers (a dense one, then a sparse one) keep compiles short and run
# both kinds of feed-forward layer. Capacity factor 0.5 with 4 experts binds whenever routing is uneven:
# eval-mode scoring drops tokens, and no-drop decoding must not.
CONFIGS = {"sparse": tiny_switch_config(eval_capacity_factor=0.5).replace(num_encoder_layers=1,
                                                                          encoder_sparse="all")}


def _params(config):
  return jax.tree_util.tree_map(jnp.asarray, random_params(config))


def _encoder_tokens(batch=3, length=7, seed=0):
  tokens = np.random.RandomState(seed).randint(2, 64, (batch, length)).astype(np.int32)
  tokens[1, 5:] = 0                                                          # a padded row
  return jnp.asarray(tokens)


def _recompute_greedy(config, params, encoder_tokens, length):
  """Greedy decoding without a cache: each step runs the whole model on the tokens so far (padded to `length`
  and marked as padding through decoder_target_tokens, so one compile serves every step) and takes the last
  real position's logits."""
  apply = jitted_apply(config)
  batch = encoder_tokens.shape[0]
  tokens = np.zeros((batch, length), np.int32)
  logits = np.zeros((batch, length, config.vocab_size), np.float32)
  done = np.zeros(batch, bool)
  for t in range(length):
    inputs = np.concatenate([np.zeros((batch, 1), np.int32), tokens[:, :-1]], 1)
    inputs[:, t + 1:] = 0
    real = (np.arange(length) <= t)[None].repeat(batch, 0).astype(np.int32)  # 1 on the t + 1 real positions
    step_logits = np.asarray(apply({"params": params}, encoder_tokens, jnp.asarray(inputs),
                                   decoder_target_tokens=jnp.asarray(real))[0])[:, t]
    token = np.where(done, 0, step_logits.argmax(-1))
    tokens[:, t], logits[:, t] = token, step_logits
    done |= token == EOS_ID
  return tokens, logits


@pytest.fixture(scope="module")
def greedy():
  """name -> (config, params, encoder tokens, greedy result with logits); one compile per config."""
  out = {}
  for name, config in CONFIGS.items():
    params, enc = _params(config), _encoder_tokens()
    out[name] = (config, params, enc, generate(config, params, enc, DecodeConfig(max_decode_length=LENGTH),
                                                   return_logits=True))
  return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_equals_full_recompute(greedy, name):
  config, params, enc, result = greedy[name]
  # The same routing as decoding (no-drop for the sparse model: its eval capacity factor 0.5 would bind).
  assert decoding_config(config).moe.dispatch == "dropless" and config.moe.dispatch != "dropless"
  tokens, logits = _recompute_greedy(decoding_config(config), params, enc, LENGTH)
  np.testing.assert_array_equal(np.asarray(result.tokens), tokens)
  np.testing.assert_allclose(np.asarray(result.logits), logits, atol=2e-5, rtol=1e-5)
  assert len(np.unique(tokens)) > 2                                          # not a degenerate constant output


def test_bfloat16_decoding_keeps_an_exact_float32_self_cache_on_cpu():
  """A bfloat16 model decodes over a float32 self-attention cache on the CPU (attention.self_cache_dtype): it
  holds the bfloat16 keys and values exactly, and the cached greedy decode still equals the full recompute."""
  from switchx.decode import _start
  from switchx.models.encoder_decoder import EncoderDecoder
  config = decoding_config(CONFIGS["sparse"].replace(dtype="bfloat16"))
  params, enc = _params(config), _encoder_tokens()
  @jax.jit
  def two_steps(params, enc):
    cache, step, _ = _start(EncoderDecoder(config), params, enc, LENGTH)
    for token in (5, 9):
      _, cache = step(cache, jnp.full((enc.shape[0],), token, jnp.int32))
    return cache
  cache = two_steps(params, enc)
  selfs = [v for path, v in jax.tree_util.tree_flatten_with_path(cache)[0]
           if "self_attention" in jax.tree_util.keystr(path) and v.ndim == 4]
  assert len(selfs) == 2 * config.num_decoder_layers                         # keys and values of each layer
  for kv in selfs:                                                           # [B, H, Dh, L]
    kv = np.asarray(kv)
    assert kv.dtype == np.float32
    np.testing.assert_array_equal(kv, np.asarray(jnp.asarray(kv).astype(jnp.bfloat16).astype(jnp.float32)))
    assert (kv[..., :2] != 0).any() and (kv[..., 2:] == 0).all()             # two steps written, in order
  result = generate(config, params, enc, DecodeConfig(max_decode_length=LENGTH), return_logits=True)
  tokens, logits = _recompute_greedy(config, params, enc, LENGTH)
  np.testing.assert_array_equal(np.asarray(result.tokens), tokens)
  assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(serving_params(CONFIGS["sparse"], params)),
                                     jax.tree_util.tree_leaves(params)))          # float32 model: unchanged
  # bfloat16 roundings in a different order (one query against L): within ~one bfloat16 step of the largest
  # logits (|logit| < 4 here, step 2**-6 = 0.016); measured 0.007.
  assert np.abs(logits).max() < 4
  np.testing.assert_allclose(np.asarray(result.logits), logits, atol=2e-2, rtol=0)


def test_capacity_binding_cached_vs_full_recompute():
  """With the eval capacity kept (moe_routing="eval_capacity") routing groups differ: a cached step routes the
  batch's B current tokens as one group, a full recompute routes all B * (t + 1) tokens of the prefixes.
  Step 0 (both groups are the B first tokens) is equal; later steps are not, and the full pass drops tokens."""
  config = CONFIGS["sparse"].replace(moe=CONFIGS["sparse"].moe.__class__(
      **{**CONFIGS["sparse"].moe.__dict__, "eval_capacity_factor": 0.25}))
  params, enc, length = _params(config), _encoder_tokens(batch=4, seed=3), 2
  cached = generate(config, params, enc, DecodeConfig(max_decode_length=length, moe_routing="eval_capacity"),
                    return_logits=True)
  routing = decoding_config(config, "eval_capacity")
  assert routing.moe.eval_capacity_factor == 0.25
  tokens = np.asarray(cached.tokens)
  full, dropped = [], []
  for t in range(length):                                                   # real prefix lengths: no padding
    inputs = jnp.asarray(np.concatenate([np.zeros((4, 1), np.int32), tokens[:, :t]], 1))
    logits, aux = jitted_apply(routing)({"params": params}, enc, inputs)
    full.append(np.asarray(logits[:, t]))
    dropped.append(max(float(a["dropped_fraction"]) for a in aux.values()))
  cached_logits = np.asarray(cached.logits)
  np.testing.assert_allclose(cached_logits[:, 0], full[0], atol=2e-5)      # same group at step 0
  assert max(dropped) > 0                                                    # capacity binds
  assert not all(np.allclose(cached_logits[:, t], full[t], atol=1e-4) for t in range(1, length))


def test_beam_one_equals_greedy(greedy):
  config, params, enc, result = greedy["sparse"]
  beam = generate(config, params, enc, DecodeConfig(strategy="beam", beam_size=1, length_penalty=0.0,
                                                    max_decode_length=LENGTH))
  np.testing.assert_array_equal(np.asarray(beam.tokens), np.asarray(result.tokens))
  np.testing.assert_allclose(np.asarray(beam.scores), np.asarray(result.scores), rtol=1e-5)


def test_sampling_limits_equal_greedy_and_sampling_is_seeded(greedy):
  config, params, enc, result = greedy["sparse"]
  sample = lambda **kw: np.asarray(generate(config, params, enc, DecodeConfig(
      strategy="sample", max_decode_length=LENGTH, **kw)).tokens)
  expected = np.asarray(result.tokens)
  np.testing.assert_array_equal(sample(top_k=1, temperature=1.0), expected)
  np.testing.assert_array_equal(sample(temperature=0.0), expected)
  np.testing.assert_array_equal(sample(temperature=1.0, top_p=1e-6), expected)  # the nucleus is the top token
  hot = [sample(temperature=5.0, seed=s) for s in (0, 0, 1)]
  np.testing.assert_array_equal(hot[0], hot[1])                              # a seed fixes the draw
  assert not np.array_equal(hot[0], expected) and not np.array_equal(hot[0], hot[2])


def test_no_drop_row_decodes_the_same_alone_and_in_a_batch(greedy):
  config, params, enc, result = greedy["sparse"]
  others = _encoder_tokens(batch=3, seed=7)
  batch = jnp.concatenate([others[:1], enc[1:2], others[1:]], 0)            # row 1 of `enc` among strangers
  in_batch = generate(config, params, batch, DecodeConfig(max_decode_length=LENGTH), return_logits=True)
  alone = generate(config, params, enc[1:2], DecodeConfig(max_decode_length=LENGTH), return_logits=True)
  for got in (in_batch, result):
    row = 1
    np.testing.assert_array_equal(np.asarray(got.tokens)[row], np.asarray(alone.tokens)[0])
    np.testing.assert_allclose(np.asarray(got.logits)[row], np.asarray(alone.logits)[0], atol=2e-5)


def test_no_drop_dropless_blocks_decode_a_row_as_the_slot_layout_alone():
  """With 4 rows of 64 encoder tokens the sparse encoder layer runs its dropless blocks (64 tokens per expert);
  one row alone (16 per expert) gives every expert a slot per token instead: the same routing, so the row
  decodes to the same tokens and logits."""
  from switchx.moe.dispatch import dropless_block_size
  config = CONFIGS["sparse"]
  params = _params(config)
  enc = _encoder_tokens(batch=4, length=64, seed=11)
  assert dropless_block_size(4 * 64, 1, 4) > 0 and dropless_block_size(64, 1, 4) == 0
  settings = DecodeConfig(max_decode_length=LENGTH)
  in_batch = generate(config, params, enc, settings, return_logits=True)
  alone = generate(config, params, enc[2:3], settings, return_logits=True)
  np.testing.assert_array_equal(np.asarray(in_batch.tokens)[2], np.asarray(alone.tokens)[0])
  np.testing.assert_allclose(np.asarray(in_batch.logits)[2], np.asarray(alone.logits)[0], atol=2e-5)


def test_beam_scores_match_teacher_forced_rescoring(greedy):
  """Every kept hypothesis' score is its log-probability (recomputed by one full forward pass over it) divided
  by the length penalty: checks the beams' bookkeeping and the cache reordering."""
  config, params, enc, _ = greedy["sparse"]
  alpha, k = 0.6, 3
  result = generate(config, params, enc, DecodeConfig(strategy="beam", beam_size=k, length_penalty=alpha,
                                                      max_decode_length=LENGTH))
  beams, scores = np.asarray(result.beams), np.asarray(result.beam_scores)   # [B, K, L], [B, K]
  assert (np.diff(scores, axis=1) <= 1e-6).all()                             # best first
  targets = beams.reshape(-1, LENGTH)
  inputs = np.concatenate([np.zeros((len(targets), 1), np.int32), targets[:, :-1]], 1)
  logits, _ = jitted_apply(decoding_config(config))({"params": params}, jnp.repeat(enc, k, 0), jnp.asarray(inputs))
  log_probs = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), targets[..., None], -1)[..., 0]
  ended = np.cumsum(targets == EOS_ID, axis=1) - (targets == EOS_ID)        # EOS seen before this position
  real = ended == 0
  lengths = real.sum(1)
  expected = (log_probs * real).sum(1) / np.asarray(length_penalty(lengths, alpha))
  np.testing.assert_allclose(scores.reshape(-1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("changes,field", [
    (dict(strategy="nucleus"), "strategy"), (dict(max_decode_length=0), "max_decode_length"),
    (dict(beam_size=0), "beam_size"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(moe_routing="drop"), "moe_routing"),
])
def test_bad_decode_config_names_the_field(changes, field):
  with pytest.raises(ValueError, match=f"DecodeConfig.{field}="):
    DecodeConfig(**changes)


def test_bad_inputs_fail_before_compiling(greedy):
  config, params, enc, _ = greedy["sparse"]
  with pytest.raises(ValueError, match="beam_size"):
    generate(config, params, enc, DecodeConfig(strategy="beam", beam_size=40))   # 2 * 40 > vocabulary 64
  with pytest.raises(ValueError, match="vocab_size"):
    generate(config, params, enc.at[0, 0].set(64), DecodeConfig())
  with pytest.raises(ValueError, match="batch, length"):
    generate(config, params, enc[0], DecodeConfig())


def test_argmax_equals_jnp_argmax_with_ties_infinities_and_nan():
  from switchx.losses import argmax
  rng = np.random.RandomState(0)
  for _ in range(50):
    x = rng.randint(0, 4, (3, 9)).astype(np.float32)                         # many ties
    x[rng.randint(3), rng.randint(9)] = rng.choice([np.nan, -np.inf, np.inf])
    np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(x))), np.asarray(jnp.argmax(jnp.asarray(x), -1)))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_serving_params_decode_exactly_as_float32_parameters(tied):
  """serving_params' weights (bfloat16 kernels, float32 routers / scales / position tables / token embedding,
  and with tied logits the table transposed in bfloat16) decode exactly as the float32 parameters cast inside
  every call: the same tokens, scores and logits."""
  config = decoding_config(CONFIGS["sparse"].replace(dtype="bfloat16", logits_via_embedding=tied))
  params, enc = _params(config), _encoder_tokens()
  if tied:  # a random tied model repeats its input token: the start token's row zero, each row starts elsewhere
    params["token_embedder"]["embedding"] = params["token_embedder"]["embedding"].at[0].set(0)
  settings = DecodeConfig(max_decode_length=LENGTH)
  served = serving_params(config, params)
  dtypes = {}                                                                # last key -> dtypes
  for path, x in jax.tree_util.tree_flatten_with_path(served)[0]:
    dtypes.setdefault(path[-1].key, set()).add(str(x.dtype))
  expected = {"kernel", "embedding", "wi_0", "wi_1", "wo", "router", "scale", "rel_embedding"}   # gated experts
  assert set(dtypes) == expected | ({"logits_kernel"} if tied else set())
  assert all(dtypes[k] == {"bfloat16"} for k in ("kernel", "wi_0", "wi_1", "wo") + (("logits_kernel",) if tied else ()))
  assert all(dtypes[k] == {"float32"} for k in ("embedding", "router", "scale", "rel_embedding"))
  if tied:
    embedder = served["token_embedder"]
    np.testing.assert_array_equal(np.asarray(embedder["logits_kernel"]),
                                  np.asarray(embedder["embedding"].astype(jnp.bfloat16)).T)
  result = generate(config, params, enc, settings, return_logits=True)
  again = generate(config, served, enc, settings, return_logits=True)
  assert len(np.unique(np.asarray(result.tokens))) > 2                       # not a degenerate constant output
  for a, b in zip(again, result):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if tied:  # the logits come from logits_kernel (the table itself is only gathered from)
    zeroed = {**served, "token_embedder": {**served["token_embedder"],
                                           "logits_kernel": jnp.zeros_like(served["token_embedder"]["logits_kernel"])}}
    assert not np.asarray(generate(config, zeroed, enc, settings, return_logits=True).logits).any()

"""The dense T5 v1.1 encoder-decoder (and its sparse variant): shapes, causality, packing, padding, relative
position buckets, parameter counts against transformers, logical axes, config errors."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_params, jitted_apply, tiny_config, tiny_switch_config
from switchx.config import ModelConfig, MoeConfig
from switchx.models.encoder_decoder import EncoderDecoder
from switchx.nn.attention import relative_position_bucket


def _init(config, seed=0):
  return _Model(config), init_params(config, seed)


class _Model:
  """The model with a jitted apply (shared per config)."""

  def __init__(self, config):
    self.apply = jitted_apply(config)


def _tokens(shape, seed, vocab=64):
  return jnp.asarray(np.random.RandomState(seed).randint(2, vocab, shape), jnp.int32)


@pytest.mark.parametrize("sparse", [False, True])
def test_output_shapes_and_aux(sparse):
  config = tiny_switch_config() if sparse else tiny_config()
  model, params = _init(config)
  logits, aux = model.apply({"params": params}, _tokens((3, 12), 0), _tokens((3, 7), 1))
  assert logits.shape == (3, 7, config.vocab_size) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  if sparse:
    assert set(aux) == {"encoder/layers_1", "decoder/layers_1"}
    assert aux["encoder/layers_1"]["expert_usage"].shape == (4,)
  else:
    assert aux == {}


@pytest.mark.parametrize("sparse", [False, True])
def test_decoder_is_causal(sparse):
  # With no-drop routing a token's MoE output depends only on itself, so causality must hold exactly.
  config = tiny_switch_config(eval_capacity_factor=0.0) if sparse else tiny_config()
  model, params = _init(config)
  enc, dec = _tokens((2, 12), 0), _tokens((2, 8), 1)
  changed = dec.at[:, 5:].set(_tokens((2, 3), 2))
  a, _ = model.apply({"params": params}, enc, dec)
  b, _ = model.apply({"params": params}, enc, changed)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  assert not np.allclose(a[:, 5:], b[:, 5:])  # later positions do see the change


@pytest.mark.parametrize("sparse", [False, True])
def test_packed_sequences_equal_separate_runs(sparse):
  config = tiny_switch_config(eval_capacity_factor=0.0) if sparse else tiny_config()
  model, params = _init(config)
  enc_a, enc_b = _tokens((1, 5), 3), _tokens((1, 6), 4)
  dec_a, dec_b = _tokens((1, 3), 5), _tokens((1, 4), 6)
  run = lambda **kw: model.apply({"params": params}, **kw)[0]
  alone_a = run(encoder_input_tokens=enc_a, decoder_input_tokens=dec_a)
  alone_b = run(encoder_input_tokens=enc_b, decoder_input_tokens=dec_b)
  seg = lambda a, b: jnp.asarray([[1] * a + [2] * b], jnp.int32)
  pos = lambda a, b: jnp.asarray([list(range(a)) + list(range(b))], jnp.int32)
  packed = run(encoder_input_tokens=jnp.concatenate([enc_a, enc_b], 1),
               decoder_input_tokens=jnp.concatenate([dec_a, dec_b], 1),
               encoder_segment_ids=seg(5, 6), decoder_segment_ids=seg(3, 4),
               encoder_positions=pos(5, 6), decoder_positions=pos(3, 4))
  np.testing.assert_allclose(packed[:, :3], alone_a, atol=1e-5)
  np.testing.assert_allclose(packed[:, 3:], alone_b, atol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_padding_does_not_change_real_positions(sparse):
  config = tiny_switch_config(eval_capacity_factor=0.0) if sparse else tiny_config()
  model, params = _init(config)
  enc, dec, tgt = _tokens((2, 9), 0), _tokens((2, 5), 1), _tokens((2, 5), 2)
  base, base_aux = model.apply({"params": params}, enc, dec, decoder_target_tokens=tgt)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n)))
  padded, padded_aux = model.apply({"params": params}, pad(enc, 7), pad(dec, 3), decoder_target_tokens=pad(tgt, 3))
  np.testing.assert_allclose(padded[:, :5], base, atol=1e-5)
  if sparse:  # padding is never routed nor counted
    for name in base_aux:
      for key in ("load_balance_loss", "router_z_loss", "expert_usage", "router_entropy"):
        np.testing.assert_allclose(padded_aux[name][key], base_aux[name][key], rtol=1e-5, atol=1e-6)


# Hand-worked from T5's bucketing: bidirectional, 32 buckets, max distance 128 -> 16 buckets per direction, of
# which 8 exact (distances 0..7), then 8 log-spaced: 8 + floor(log(d/8) / log(16) * 8), capped at 15.
# Keys after the query are offset by 16. relative = key - query.
BIDIRECTIONAL_32_128 = {
    0: 0, -1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -16: 10, -32: 12, -64: 14, -127: 15, -128: 15, -1000: 15,
    1: 17, 7: 23, 8: 24, 12: 25, 16: 26, 32: 28, 64: 30, 128: 31, 500: 31,
}
# Causal, 32 buckets, max distance 128: exact 0..15, then 16 + floor(log(d/16) / log(8) * 16), capped at 31;
# keys after the query (relative > 0) all land in bucket 0.
CAUSAL_32_128 = {
    0: 0, -1: 1, -15: 15, -16: 16, -20: 17, -32: 21, -64: 26, -100: 30, -128: 31, -1000: 31, 1: 0, 50: 0,
}


@pytest.mark.parametrize("table,bidirectional", [(BIDIRECTIONAL_32_128, True), (CAUSAL_32_128, False)])
def test_relative_position_buckets_hand_worked(table, bidirectional):
  relative = np.array(list(table), np.int32)
  expected = np.array(list(table.values()), np.int32)
  np.testing.assert_array_equal(relative_position_bucket(relative, bidirectional, 32, 128), expected)
  np.testing.assert_array_equal(relative_position_bucket(jnp.asarray(relative), bidirectional, 32, 128), expected)


def test_every_parameter_has_logical_axes():
  model = EncoderDecoder(tiny_switch_config())
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32),
                         jnp.ones((1, 4), jnp.int32))["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
  expert_kernels = [l for l in leaves if "expert" in l.names]
  assert expert_kernels and all(l.names[0] == "expert" for l in expert_kernels)


def test_bfloat16_activations_keep_float32_params():
  model, params = _init(tiny_switch_config().replace(dtype="bfloat16"))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  logits, _ = model.apply({"params": params}, _tokens((2, 12), 0), _tokens((2, 8), 1))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("equation,shapes", [("bld,vd->blv", ((2, 3, 8), (11, 8))),      # tied logits
                                             ("bd,dv->bv", ((4, 8), (8, 11)))])          # a dense layer
def test_bfloat16_matmul_to_float32_differentiates_in_bfloat16(equation, shapes):
  """matmul with bfloat16 operands and a float32 result (the logits): the value is the float32 product of the
  rounded operands, and the gradients equal autodiff's up to the bfloat16 rounding of the cotangent, while both
  backward products run on bfloat16 operands (XLA's CPU backend upcasts them to float32 under plain autodiff)."""
  from switchx.nn.linear import matmul
  rng = np.random.RandomState(0)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)
  out_shape = jax.eval_shape(lambda a, b: jnp.einsum(equation, a, b), a, b).shape
  weights = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  rounded = lambda v: v.astype(jnp.bfloat16).astype(jnp.float32)
  ours = lambda a, b: matmul(equation, a, b, jnp.bfloat16, jnp.float32)
  reference = lambda a, b: jnp.einsum(equation, rounded(a), rounded(b), precision="highest")
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)) * weights)
  (v1, g1), (v2, g2) = (jax.value_and_grad(loss(f), argnums=(0, 1))(a, b) for f in (ours, reference))
  assert ours(a, b).dtype == jnp.float32
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for mine, theirs in zip(g1, g2):
    assert mine.dtype == jnp.float32
    np.testing.assert_allclose(mine, theirs, atol=2e-2 * float(jnp.abs(theirs).max()))
  stablehlo = jax.jit(jax.grad(loss(ours), argnums=(0, 1))).lower(a, b).as_text()
  operand_types = re.findall(r"stablehlo\.dot_general.*: \((tensor<[^>]*>), (tensor<[^>]*>)\)", stablehlo)
  assert len(operand_types) == 3                                     # forward and two backward products
  assert all("bf16" in lhs and "bf16" in rhs for lhs, rhs in operand_types), operand_types


@pytest.mark.parametrize("equation,shapes", [("abc,cde->abde", ((2, 3, 8), (8, 2, 4))),            # a projection
                                             ("bhqk,bhdk->bqhd", ((2, 2, 3, 5), (2, 2, 4, 5)))])  # attention
def test_bfloat16_matmul_gradients_are_autodiffs_with_bfloat16_backward_products(equation, shapes):
  """matmul with bfloat16 operands and a bfloat16 result (every layer's product): the cotangent of a bfloat16
  result holds bfloat16 values, so rounding it is exact and the gradients are plain autodiff's (up to the order
  of float32 summation before the same bfloat16 rounding), while both backward products run on bfloat16
  operands where autodiff upcasts them to float32."""
  from switchx.nn.linear import matmul
  rng = np.random.RandomState(0)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)
  out_shape = jax.eval_shape(lambda a, b: jnp.einsum(equation, a, b), a, b).shape
  weights = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  bf16 = jnp.bfloat16
  ours = lambda a, b: matmul(equation, a, b, bf16)
  autodiff = lambda a, b: jnp.einsum(equation, a.astype(bf16), b.astype(bf16),
                                     preferred_element_type=jnp.float32).astype(bf16)
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b).astype(jnp.float32)) * weights)
  (v1, g1), (v2, g2) = (jax.value_and_grad(loss(f), argnums=(0, 1))(a, b) for f in (ours, autodiff))
  assert ours(a, b).dtype == bf16 and float(v1) == float(v2)
  for mine, theirs in zip(g1, g2):
    assert mine.dtype == jnp.float32
    np.testing.assert_allclose(mine, theirs, rtol=2.0 ** -8)                # one bfloat16 rounding step
  dot_operands = lambda f: re.findall(r"stablehlo\.dot_general.*: \((tensor<[^>]*>), (tensor<[^>]*>)\)",
                                      jax.jit(jax.grad(loss(f), argnums=(0, 1))).lower(a, b).as_text())
  assert len(dot_operands(ours)) == 3                                     # forward and two backward products
  assert all("bf16" in lhs and "bf16" in rhs for lhs, rhs in dot_operands(ours)), dot_operands(ours)
  assert any("f32" in lhs + rhs for lhs, rhs in dot_operands(autodiff))    # what the custom backward avoids


def test_init_scale_sets_kernel_std():
  config = tiny_config(d_model=256, d_ff=256, num_heads=4, head_dim=64, init_scale=0.1)
  _, params = _init(config)
  wo = np.asarray(params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])  # fan_in 256
  assert abs(wo.std() - np.sqrt(0.1 / 256)) < 0.1 * np.sqrt(0.1 / 256)
  emb = np.asarray(params["token_embedder"]["embedding"])
  assert abs(emb.std() - 1.0) < 0.1


def _switchx_param_count(config: ModelConfig) -> int:
  shapes = jax.eval_shape(EncoderDecoder(config).init, jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32),
                          jnp.ones((1, 4), jnp.int32))["params"]
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)))


T5_V1_1 = {  # name: (d_model, d_kv, d_ff, layers, heads)
    "small": (512, 64, 1024, 8, 6),
    "base": (768, 64, 2048, 12, 12),
}


@pytest.mark.parametrize("name", sorted(T5_V1_1))
def test_t5_v1_1_parameter_counts_match_transformers(name):
  torch = pytest.importorskip("torch", reason="needs the interop extra: pip install -e '.[interop]'")
  transformers = pytest.importorskip("transformers", reason="needs the interop extra")
  d_model, d_kv, d_ff, layers, heads = T5_V1_1[name]
  hf_config = transformers.T5Config(vocab_size=32128, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                                    num_heads=heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  with torch.device("meta"):
    hf = transformers.T5ForConditionalGeneration(hf_config)
  # transformers 5.x always ties lm_head to the shared embedding object, although T5 v1.1 checkpoints store a
  # separate lm_head. Count what a v1.1 checkpoint stores: every tensor once, the encoder/decoder
  # embed_tokens aliases of `shared` excluded, lm_head included.
  hf_count = sum(p.numel() for n, p in hf.named_parameters(remove_duplicate=False)
                 if not n.endswith("embed_tokens.weight"))
  ours = _switchx_param_count(ModelConfig(vocab_size=32128, d_model=d_model, head_dim=d_kv, d_ff=d_ff,
                                          num_encoder_layers=layers, num_decoder_layers=layers,
                                          num_heads=heads, activation="gated-gelu"))
  assert ours == hf_count
  assert ours == {"small": 76_961_152, "base": 247_577_856}[name]  # the published 77M / 248M


@pytest.mark.parametrize("changes,field", [
    (dict(num_heads=5, head_dim=None), "num_heads"),
    (dict(activation="swishy"), "activation"),
    (dict(dtype="float16"), "dtype"),
    (dict(encoder_sparse="every:x"), "encoder_sparse"),
    (dict(decoder_sparse=(0, 9)), "decoder_sparse"),
])
def test_bad_config_names_the_field(changes, field):
  with pytest.raises(ValueError, match=field):
    tiny_config(**changes)


def test_tokens_beyond_vocab_fail_naming_vocab_size():
  params = init_params(tiny_config())
  with pytest.raises(ValueError, match="vocab_size"):  # concrete inputs are checked before any compute
    EncoderDecoder(tiny_config()).apply({"params": params}, jnp.full((1, 4), 64, jnp.int32), jnp.ones((1, 4), jnp.int32))


def test_sparse_layouts():
  config = tiny_config(num_encoder_layers=6, num_decoder_layers=4, encoder_sparse="every:2",
                       decoder_sparse=(0, 3), moe=MoeConfig(num_experts=2))
  assert config.encoder_sparse_layers == (1, 3, 5)  # i % n == n - 1, the original Switch placement
  assert config.decoder_sparse_layers == (0, 3)
  assert tiny_config(encoder_sparse="all").encoder_sparse_layers == (0, 1)
  assert tiny_config(encoder_sparse="none").encoder_sparse_layers == ()


@pytest.mark.parametrize("batch,q_len,k_len,heads,head_dim", [(2, 16, 16, 4, 64), (4, 1, 9, 8, 8),
                                                              (1, 7, 7, 1, 64), (2, 9, 200, 4, 8)])
def test_bfloat16_attention_gradients_run_and_track_float32(batch, q_len, k_len, heads, head_dim):
  """Attention in bfloat16, differentiated and run (not only compiled): XLA's CPU backend can compile a bfloat16
  product onto a runtime kernel that rejects it when run ("Unsupported element type for DotThunk::Execute: BF16
  x BF16 = F32"), depending on the products' layouts, which is how some attention layouts failed. Single-query,
  unequal-length and one-head shapes; the gradients follow float32's within bfloat16's precision."""
  from switchx.nn.attention import MultiHeadAttention
  rng = np.random.RandomState(0)
  q_in = jnp.asarray(rng.normal(size=(batch, q_len, 32)), jnp.float32)
  kv_in = jnp.asarray(rng.normal(size=(batch, k_len, 32)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(1, heads, q_len, k_len)), jnp.float32)
  make = lambda dtype: MultiHeadAttention(num_heads=heads, head_dim=head_dim, dropout_rate=0.0, init_scale=1.0,
                                          dtype=dtype)
  params = make(jnp.float32).init(jax.random.PRNGKey(0), q_in, kv_in, bias, True)

  def grads(dtype):
    loss = lambda p, x, y: jnp.sum(jnp.sin(make(dtype).apply(p, x.astype(dtype), y.astype(dtype), bias, True)
                                           .astype(jnp.float32)))
    return jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, q_in, kv_in))

  low, high = jax.tree_util.tree_leaves(grads(jnp.bfloat16)), jax.tree_util.tree_leaves(grads(jnp.float32))
  for mine, reference in zip(low, high):
    assert bool(jnp.all(jnp.isfinite(mine)))
    scale = float(jnp.max(jnp.abs(reference)))
    np.testing.assert_allclose(mine, reference, atol=0.03 * scale)        # bfloat16 products: <= 0.014 seen

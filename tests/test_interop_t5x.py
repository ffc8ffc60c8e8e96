"""t5x / flaxformer import: tiny checkpoints written here in the t5x layout (orbax PyTree and the legacy
msgpack + TensorStore format) come back as the params they were made from, giving the same logits."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jitted_apply, tiny_config
from random_params import random_params
from switchx.config import MoeConfig
from switchx.interop import import_t5x
from switchx.interop.param_tree import flatten, unflatten

MOE = MoeConfig(num_experts=4, group_size=64, min_capacity=1)
CONFIGS = {
    # Switch-XXL style: gated-GELU experts, separate output logits, every other layer sparse
    "xxl-like": tiny_config(activation="gated-gelu", logits_via_embedding=False, encoder_sparse="every:2",
                            decoder_sparse="every:2", moe=MOE),
    # Switch-Base style: ReLU, logits tied to the embedding
    "base-like": tiny_config(activation="relu", logits_via_embedding=True, encoder_sparse="every:2",
                             decoder_sparse="every:2", moe=MOE),
    # Switch-C style: ReLU, separate logits, every layer sparse
    "c-like": tiny_config(activation="relu", logits_via_embedding=False, encoder_sparse="all",
                          decoder_sparse="all", moe=MOE),
}


def t5x_layout(config, params, flat_attention: bool) -> dict:
  """{t5x name: array}, written from the published flaxformer names (not from the importer's mapping).
  flat_attention: store attention kernels flattened, [D, H*Dh] / [H*Dh, D], as flaxformer does."""
  p = flatten(params)
  d_model = config.d_model
  t = {"token_embedder/embedding": p["token_embedder/embedding"]}
  for stack, num_layers, sparse in (("encoder", config.num_encoder_layers, config.encoder_sparse_layers),
                                    ("decoder", config.num_decoder_layers, config.decoder_sparse_layers)):
    t[f"{stack}/relpos_bias/rel_embedding"] = p[f"{stack}/relpos_bias/rel_embedding"]
    if stack == "encoder":
      attentions, norms = ["attention"], ["pre_attention_layer_norm", "pre_mlp_layer_norm"]
    else:
      attentions = ["self_attention", "encoder_decoder_attention"]
      norms = ["pre_self_attention_layer_norm", "pre_cross_attention_layer_norm", "pre_mlp_layer_norm"]
    for i in range(num_layers):
      layer = f"{stack}/layers_{i}"
      for attention in attentions:
        for proj in ("query", "key", "value", "out"):
          kernel = p[f"{layer}/{attention}/{proj}/kernel"]
          if flat_attention:
            kernel = kernel.reshape(-1, d_model) if proj == "out" else kernel.reshape(d_model, -1)
          t[f"{layer}/{attention}/{proj}/kernel"] = kernel
      for norm in norms:
        t[f"{layer}/{norm}/scale"] = p[f"{layer}/{norm}/scale"]
      gated = config.activation.startswith("gated-")
      for w in (["wi_0", "wi_1"] if gated else ["wi"]) + ["wo"]:
        if i in sparse:
          t[f"{layer}/mlp/expert/{w}/kernel"] = p[f"{layer}/moe/experts/{w}"]
        else:
          t[f"{layer}/mlp/{w}/kernel"] = p[f"{layer}/mlp/{w}/kernel"]
      if i in sparse:
        t[f"{layer}/mlp/router/router_weights/w/kernel"] = p[f"{layer}/moe/router"]
    t[f"{stack}/{stack}_norm/scale"] = p[f"{stack}/final_layer_norm/scale"]
  if not config.logits_via_embedding:
    t["decoder/logits_dense/kernel"] = p["decoder/logits_dense/kernel"]
  return t


def write_orbax(path, layout: dict) -> str:
  import orbax.checkpoint as ocp

  ocp.PyTreeCheckpointer().save(os.path.abspath(path), {"target": unflatten(layout),
                                                        "state": {"step": np.int32(7)}})
  return str(path)


def write_legacy(path, layout: dict) -> str:
  """The legacy t5x format: msgpack `checkpoint` with {"optimizer": {"target": ..., "state": ...}}; arrays of
  64+ elements as zarr TensorStores under relative paths, smaller ones inline."""
  import tensorstore as ts
  from flax import serialization

  os.makedirs(path)
  tree = {}
  for name, array in layout.items():
    if array.size >= 64:
      relative = "target." + name.replace("/", ".")
      metadata = {"shape": list(array.shape), "chunks": list(array.shape), "dtype": "<f4",
                  "compressor": {"id": "gzip"}}
      store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(path, relative)},
                       "metadata": metadata}, create=True).result()
      store.write(array).result()
      array = {"driver": "zarr", "kvstore": {"driver": "file", "path": relative}, "metadata": metadata}
    tree[name] = array
  state = {"optimizer": {"target": unflatten(tree), "state": {"step": np.int32(7)}}}
  with open(os.path.join(path, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(state))
  return str(path)


def _tokens(shape, seed):
  return jnp.asarray(np.random.RandomState(seed).randint(2, 64, shape), jnp.int32)


def _assert_same_params(ours, reference):
  ours, reference = flatten(ours), flatten(reference)
  assert ours.keys() == reference.keys()
  for path in reference:
    assert ours[path].dtype == np.float32 and np.array_equal(ours[path], reference[path]), path


@pytest.mark.parametrize("name,fmt", [("xxl-like", "orbax"), ("base-like", "legacy"), ("c-like", "legacy")])
def test_import_gives_the_params_and_logits(tmp_path, name, fmt):
  config = CONFIGS[name]
  params = random_params(config, seed=1)
  if fmt == "orbax":
    path = write_orbax(tmp_path / "checkpoint_7", t5x_layout(config, params, flat_attention=False))
  else:
    layout = t5x_layout(config, params, flat_attention=True)
    layout["encoder/layers_1/mlp/router/router_weights/w/bias"] = np.zeros(4, np.float32)  # accepted, dropped
    path = write_legacy(tmp_path / "checkpoint_7", layout)
  imported = import_t5x(path, config)
  _assert_same_params(imported, params)
  if name != "c-like":  # one compile per config; the params are bit-identical anyway
    enc, dec = _tokens((2, 12), 0), _tokens((2, 7), 1)
    ours, _ = jitted_apply(config)({"params": imported}, enc, dec)
    reference, _ = jitted_apply(config)({"params": params}, enc, dec)
    np.testing.assert_array_equal(ours, reference)


def test_config_mismatch_fails_with_hints(tmp_path):
  config = CONFIGS["xxl-like"]
  path = write_orbax(tmp_path / "ckpt", t5x_layout(config, random_params(config), flat_attention=True))
  with pytest.raises(ValueError, match=r"unexpected parameters: decoder/logits_dense/kernel.*"
                                       r"set logits_via_embedding=False"):
    import_t5x(path, config.replace(logits_via_embedding=True))
  with pytest.raises(ValueError, match=r"encoder/layers_1/mlp/expert/wi_0/kernel.*set encoder_sparse"):
    import_t5x(path, config.replace(encoder_sparse="none"))
  with pytest.raises(ValueError, match=r"unexpected parameters: .*wi_0.*gated"):
    import_t5x(path, config.replace(activation="relu"))
  with pytest.raises(ValueError, match=r"decoder/layers_0/mlp/wo/kernel has shape \(64, 32\), "
                                       r"the config implies \(128, 32\)"):
    import_t5x(path, config.replace(d_ff=128))
  with pytest.raises(ValueError, match="needs the ModelConfig"):
    import_t5x(path, None)


def test_bad_paths_and_router_bias(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    import_t5x(str(tmp_path / "nowhere"), CONFIGS["base-like"])
  with pytest.raises(FileNotFoundError, match="neither a legacy t5x checkpoint"):
    import_t5x(str(tmp_path), CONFIGS["base-like"])
  config = CONFIGS["base-like"]
  layout = t5x_layout(config, random_params(config), flat_attention=True)
  layout["decoder/layers_1/mlp/router/router_weights/w/bias"] = np.ones(4, np.float32)
  path = write_legacy(tmp_path / "biased", layout)
  with pytest.raises(ValueError, match="router_weights/w/bias is non-zero"):
    import_t5x(path, config)

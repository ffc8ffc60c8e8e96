"""t5x / flaxformer checkpoints -> switchx parameters.

    params = import_t5x("switch_base_e8/checkpoint_500100", config)   # the config describes the architecture

A t5x checkpoint holds no model config (gin files do), so the caller passes the ModelConfig; a mismatch fails
with the missing / unexpected names and a hint. Two on-disk formats are read:
  * the legacy t5x format (the released Switch and T5 v1.1 checkpoints): a msgpack file `checkpoint` whose tree
    holds small arrays inline and, for large ones, TensorStore specs of zarr arrays stored next to it under
    relative paths (e.g. "target.encoder.layers_0.attention.key.kernel");
  * orbax PyTree checkpoints (newer t5x, or written with orbax.checkpoint.PyTreeCheckpointer).
Parameters sit under target/ (or optimizer/target/ in flax.optim-era checkpoints); optimizer state is ignored.

Names (the flaxformer layout; switchx's own names differ only where marked ->):
  token_embedder/embedding [V, D]
  {encoder,decoder}/relpos_bias/rel_embedding [H, buckets]
  encoder/layers_i/attention/{query,key,value}/kernel  [D, H*Dh] (flaxformer stores them flattened) or [D, H, Dh]
  encoder/layers_i/attention/out/kernel               [H*Dh, D] or [H, Dh, D]
  decoder/layers_i/{self_attention,encoder_decoder_attention}/... likewise
  encoder/layers_i/{pre_attention_layer_norm,pre_mlp_layer_norm}/scale
  decoder/layers_i/{pre_self_attention_layer_norm,pre_cross_attention_layer_norm,pre_mlp_layer_norm}/scale
  {stack}/layers_i/mlp/{wi | wi_0, wi_1, wo}/kernel    dense feed-forward, [D, F] / [F, D]
  {stack}/layers_i/mlp/router/router_weights/w/kernel [D, E]     -> {stack}/layers_i/moe/router
  {stack}/layers_i/mlp/expert/{wi | wi_0, wi_1, wo}/kernel [E, D, F] / [E, F, D]  -> .../moe/experts/{...}
  encoder/encoder_norm/scale, decoder/decoder_norm/scale         -> {stack}/final_layer_norm/scale
  decoder/logits_dense/kernel [D, V]                  only with separate output logits (Switch-XXL / -C)
Assumptions (from flaxformer's modules and transformers' conversion scripts; no released checkpoint was read
here): router weights have no bias, or an all-zero .../router_weights/w/bias, which is accepted and dropped.
"""

from __future__ import annotations

import copy
import os

import numpy as np

from switchx.config import ModelConfig
from switchx.interop.param_tree import check_params, expected_shapes, listing, unflatten

_ATTENTIONS = ("attention", "self_attention", "encoder_decoder_attention")
_ROUTER_BIAS = "/mlp/router/router_weights/w/bias"


def t5x_name(path: str) -> str:
  """The t5x / flaxformer name of a switchx parameter path."""
  parts = path.split("/")
  if parts[-2:] == ["moe", "router"]:
    return "/".join(parts[:-2] + ["mlp", "router", "router_weights", "w", "kernel"])
  if parts[-3:-1] == ["moe", "experts"]:
    return "/".join(parts[:-3] + ["mlp", "expert", parts[-1], "kernel"])
  if parts[1:] == ["final_layer_norm", "scale"]:
    return f"{parts[0]}/{parts[0]}_norm/scale"
  return path


# --- reading both formats -----------------------------------------------------------------------------------
def _leaves(tree: dict, prefix: str = ""):
  """(name, leaf) pairs of a nested dict; a TensorStore spec (a dict with "driver") is a leaf."""
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and "driver" not in value:
      yield from _leaves(value, name + "/")
    else:
      yield name, value


def _read_tensorstore(spec: dict, checkpoint_dir: str, name: str) -> np.ndarray:
  """A zarr array a legacy t5x checkpoint references by a path relative to its directory."""
  import tensorstore as ts

  spec = copy.deepcopy(spec)
  kvstore = spec.get("kvstore")
  if isinstance(kvstore, dict) and "path" in kvstore:
    if kvstore.get("driver") not in ("file", "gfile", "gcs"):
      raise ValueError(f"{checkpoint_dir}: {name} is stored with kvstore driver {kvstore.get('driver')!r}; "
                       "copy the checkpoint to a local directory first.")
    spec["kvstore"] = {"driver": "file", "path": os.path.join(checkpoint_dir, kvstore["path"])}
  elif "path" in spec:  # the tensorstore < 0.1.14 form
    spec["path"] = os.path.join(checkpoint_dir, spec["path"])
    spec.setdefault("kvstore", {"driver": "file"})
  else:
    raise ValueError(f"{checkpoint_dir}: {name} has a TensorStore spec without a path: {spec}")
  try:
    return np.asarray(ts.open(spec).result().read().result())
  except Exception as e:  # tensorstore raises its own error types
    raise ValueError(f"{checkpoint_dir}: cannot read {name} ({e}); is the checkpoint directory complete?") from e


def _orbax_dir(path: str) -> str | None:
  for candidate in (path, *sorted(os.path.join(path, d) for d in os.listdir(path))):
    if os.path.isfile(os.path.join(candidate, "_METADATA")):
      return candidate
  return None


def read_t5x_arrays(path: str) -> dict[str, np.ndarray]:
  """{name: float32 array} of a t5x checkpoint's parameters, names relative to target/."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} is not a directory; pass a t5x checkpoint directory (checkpoint_<step>).")
  legacy = os.path.join(path, "checkpoint")
  if os.path.isfile(legacy):
    from flax import serialization

    with open(legacy, "rb") as f:
      tree = serialization.msgpack_restore(f.read())
  elif (orbax_dir := _orbax_dir(path)) is not None:
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(orbax_dir))
  else:
    raise FileNotFoundError(f"{path!r} is neither a legacy t5x checkpoint (no 'checkpoint' file) nor an orbax "
                            "checkpoint (no _METADATA); pass the checkpoint_<step> directory itself.")
  leaves = dict(_leaves(tree))
  for prefix in ("optimizer/target/", "target/", ""):
    params = {name[len(prefix):]: leaf for name, leaf in leaves.items() if name.startswith(prefix)}
    if params:
      break
  arrays = {}
  for name, leaf in params.items():
    array = _read_tensorstore(leaf, path, name) if isinstance(leaf, dict) else np.asarray(leaf)
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
      raise ValueError(f"{path}: parameter {name} has dtype {array.dtype}; expected floating-point weights.")
    arrays[name] = array.astype(np.float32)
  return arrays


# --- mapping ------------------------------------------------------------------------------------------------
def _hints(missing: list[str], unexpected: list[str]) -> list[str]:
  """Config changes that would explain missing / unexpected names."""
  hints = []
  if "decoder/logits_dense/kernel" in unexpected:
    hints.append("the checkpoint has separate output logits: set logits_via_embedding=False")
  if "decoder/logits_dense/kernel" in missing:
    hints.append("the checkpoint ties output logits to the embedding: set logits_via_embedding=True")
  if any("/wi_0/" in n for n in unexpected):
    hints.append("the checkpoint's feed-forward layers are gated: use a 'gated-*' activation")
  if any(n.endswith("/wi/kernel") for n in unexpected):
    hints.append("the checkpoint's feed-forward layers are not gated: use relu, gelu or silu")
  if any("/mlp/expert/" in n or "/mlp/router/" in n for n in unexpected + missing):
    sparse = sorted({n.split("/mlp/")[0] for n in unexpected if "/mlp/expert/" in n})
    hints.append(f"the sparse layers differ: the checkpoint's are {sparse or 'none'}; set encoder_sparse / "
                 "decoder_sparse (and num_experts) to match")
  return hints


def import_t5x(path: str, config: ModelConfig) -> dict:
  """switchx params of the t5x checkpoint at `path` for the architecture `config`; raises (naming the
  missing, unexpected or mis-shaped parameters) before returning anything."""
  if not isinstance(config, ModelConfig):
    raise ValueError("import_t5x needs the ModelConfig describing the checkpoint (t5x checkpoints hold no "
                     "model config; the gin files do), e.g. ModelConfig(d_model=768, ...).")
  arrays = read_t5x_arrays(path)
  for name in [n for n in arrays if n.endswith(_ROUTER_BIAS)]:
    if np.any(arrays.pop(name)):
      raise ValueError(f"{path}: {name} is non-zero; switchx routers have no bias.")
  flat, missing, wrong = {}, [], []
  for ours, shape in expected_shapes(config).items():
    name = t5x_name(ours)
    if name not in arrays:
      missing.append(name)
      continue
    array = arrays.pop(name)
    parts = ours.split("/")
    flattened_attention = len(parts) > 2 and parts[-3] in _ATTENTIONS and array.size == np.prod(shape)
    if array.shape != shape and not flattened_attention:
      wrong.append(f"{name} has shape {array.shape}, the config implies {shape}")
      continue
    flat[ours] = array.reshape(shape)
  unexpected = sorted(arrays)
  if missing or unexpected or wrong:
    problems = [f"missing parameters: {listing(missing)}" if missing else "",
                f"unexpected parameters: {listing(unexpected)}" if unexpected else "",
                "shape mismatches: " + "; ".join(wrong[:8]) if wrong else ""]
    hints = _hints(missing, unexpected)
    hint_text = f" Hints: {'; '.join(hints)}." if hints else ""
    raise ValueError(f"{path}: the checkpoint does not match the config ("
                     + "; ".join(p for p in problems if p) + ")." + hint_text)
  params = unflatten(flat)
  check_params(config, params, path)
  return params

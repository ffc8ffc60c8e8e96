"""Sparse upcycling (Komatsuzaki et al. 2022): a trained dense model (a T5 encoder-decoder or a decoder-only LM)
becomes a Switch model, then trains on.

    params = upcycle_params(dense_config, dense_params, sparse_config, jax.random.PRNGKey(0))
    summary = upcycle("runs/dense", sparse_config, train_config, data_config, model_dir="runs/upcycled")

Every expert of a sparse layer starts as that layer's dense FFN (wi / wo copied E times), its router is fresh
(normal with MoeConfig-independent `router_stddev`, 0.02 as a new model's router), and every other parameter is
copied. With Drop-Upcycling (arXiv 2502.19261, `reinit_fraction` r > 0) each expert re-initialises a random r of
its hidden units (the same columns of wi and rows of wo), drawn per expert, from the statistics of the dense
weights, so the experts start diverse. Training then runs through the normal trainer (train/loop.py) with a fresh
optimizer state or (carry_optimizer_state) the dense run's, each expert's moments its dense FFN's and the
routers' fresh (upcycle_optimizer_state); its data from the corpus' beginning or (continue_data) where the dense
run stopped. An interrupted run resumes from its own checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from switchx.config import DataConfig, DecoderOnlyConfig, ModelConfig, TrainConfig
from switchx.parallel.mesh import MeshConfig
from switchx.train import restore
from switchx.train.loop import train

LAYOUT_FIELDS = ("encoder_sparse", "decoder_sparse", "sparse")   # which layers are sparse: what upcycling changes


def sparse_layers_by_stack(config: ModelConfig | DecoderOnlyConfig) -> dict[str, tuple[int, ...]]:
  """{the parameter tree's key of each layer stack ("" for a decoder-only model's top level): its sparse layers}."""
  if isinstance(config, DecoderOnlyConfig):
    return {"": config.sparse_layers}
  return {"encoder": config.encoder_sparse_layers, "decoder": config.decoder_sparse_layers}


def check_upcyclable(dense, sparse, source: str = "the dense model") -> None:
  """The sparse config must be the dense one with some dense FFN layers made sparse, experts of the FFN's size."""
  if type(dense) is not type(sparse):
    raise ValueError(f"{source} is a {type(dense).__name__}, the upcycled config a {type(sparse).__name__}: "
                     "upcycling keeps the architecture. Give a Switch preset of the same family (e.g. "
                     "models/switch_cpu for an encoder-decoder, models/switch_lm_cpu for a decoder-only model).")
  owner = type(sparse).__name__
  if not sparse.is_sparse:
    layout = "DecoderOnlyConfig.sparse" if owner == "DecoderOnlyConfig" else "ModelConfig.encoder_sparse / decoder_sparse"
    raise ValueError(f"the upcycled config has no sparse layer: give a Switch preset (e.g. --gin_file "
                     f"models/switch_cpu) or set {layout}.")
  for name in restore.architecture_fields(dense):
    if name not in LAYOUT_FIELDS and getattr(dense, name) != getattr(sparse, name):
      raise ValueError(f"{owner}.{name}={getattr(sparse, name)!r} differs from {source}'s "
                       f"{getattr(dense, name)!r}; an upcycled model keeps every shape of the dense one. Drop the "
                       f"binding or match {source}.")
  if sparse.expert_d_ff != dense.d_ff:
    raise ValueError(f"MoeConfig.expert_d_ff={sparse.moe.expert_d_ff} differs from {source}'s d_ff={dense.d_ff}: "
                     "each expert starts as a copy of the dense FFN, so it must have its size (leave it None).")
  for stack, layers in sparse_layers_by_stack(sparse).items():
    already = sorted(set(sparse_layers_by_stack(dense)[stack]) & set(layers))
    if already:
      raise ValueError(f"{source} already has sparse {stack or 'decoder'} layers {already}; upcycling starts from "
                       "dense FFNs.")


def upcycle_params(dense_config, dense_params, sparse_config, rng: jax.Array,
                   router_stddev: float = 0.02, reinit_fraction: float = 0.0) -> dict:
  """The sparse model's parameters (numpy float32) from the dense model's: see the module doc."""
  check_upcyclable(dense_config, sparse_config)
  if not 0.0 <= reinit_fraction <= 1.0:
    raise ValueError(f"reinit_fraction={reinit_fraction}: must be in [0, 1] (the share of each expert's hidden "
                     "units Drop-Upcycling re-initialises; 0: plain upcycling).")
  num_experts = sparse_config.moe.num_experts
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), dense_params)
  out = dict(params)
  for s, (stack, sparse_layers) in enumerate(sparse_layers_by_stack(sparse_config).items()):
    layers = dict(out[stack]) if stack else out                          # a decoder-only model's layers are top-level
    for i in sparse_layers:
      router_rng, reinit_rng = jax.random.split(jax.random.fold_in(rng, 1000 * s + i))
      layer = dict(layers[f"layers_{i}"])
      mlp = layer.pop("mlp")                                             # {wi | wi_0, wi_1, wo: {kernel[, bias]}}
      experts = {name: np.repeat(w["kernel"][None], num_experts, axis=0) for name, w in mlp.items()}  # [E, ...]
      if reinit_fraction > 0:
        experts = _drop_upcycle(experts, reinit_fraction, reinit_rng)
      experts.update({f"{name}_bias": np.repeat(w["bias"][None], num_experts, axis=0)       # use_bias: [E, F|D]
                      for name, w in mlp.items() if "bias" in w})
      router = router_stddev * jax.random.normal(router_rng, (dense_config.d_model, num_experts), jnp.float32)
      layer["moe"] = {"experts": experts, "router": np.asarray(router)}
      layers[f"layers_{i}"] = layer
    if stack:
      out[stack] = layers
  return out


# An expert weight's path in the sparse tree -> its dense FFN's: ['moe']['experts']['wi_0'] <- ['mlp']['wi_0']['kernel'],
# ['moe']['experts']['wo_bias'] <- ['mlp']['wo']['bias'] (keystr spelling; the routers have no dense source).
_EXPERT_LEAF = re.compile(r"\['moe'\]\['experts'\]\['(\w+?)(_bias)?'\]")


def _dense_paths(sparse_path: str) -> list[str]:
  """Where a sparse optimizer-state leaf's dense counterpart may be: the same path with expert weights named as
  the dense FFN's, in the same optimizer branch or (Adafactor's per-expert branch, optim.per_expert) the dense one."""
  path = _EXPERT_LEAF.sub(lambda m: f"['mlp']['{m.group(1)}']['{'bias' if m.group(2) else 'kernel'}']", sparse_path)
  return [path, path.replace(".inner_states['expert']", ".inner_states['dense']", 1)]


def upcycle_optimizer_state(dense_opt_state, fresh_opt_state, num_experts: int):
  """The dense run's optimizer state carried into the upcycled model's (both host trees of the same optimizer):
  every leaf that mirrors a parameter (AdamW's moments, Adafactor's factored second moments, ...) is copied from
  the dense run, an expert's from its dense FFN's (repeated over the experts); what has no dense source (the
  routers) keeps its fresh value. Step counters are copied too, so Adam's bias correction, Adafactor's decay and
  the learning-rate schedule go on from the dense run's step (as Komatsuzaki et al. continue T5's schedule).
  A leaf whose shape fits neither way is an error."""
  dense = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(dense_opt_state)[0]}
  carried = []

  def carry(path, fresh):
    key = jax.tree_util.keystr(path)
    source = next((dense[k] for k in _dense_paths(key) if k in dense), None)
    if source is None:
      return fresh
    source, shape = np.asarray(source), np.shape(fresh)
    if source.shape == shape:
      out = source
    elif (num_experts, *source.shape) == shape:
      out = np.repeat(source[None], num_experts, axis=0)
    else:
      raise ValueError(f"optimizer state {key}: the dense run's {source.shape} fits neither {shape} nor "
                       f"({num_experts}, ...): was the dense run trained with another optimizer? Start the upcycled "
                       "model with a fresh optimizer state (no --carry_optimizer_state).")
    carried.append(key)
    return out.astype(np.asarray(fresh).dtype)

  out = jax.tree_util.tree_map_with_path(carry, fresh_opt_state)
  if not carried:
    raise ValueError("no optimizer-state entry of the dense run matches the upcycled model's: was it trained with "
                     "another optimizer (TrainConfig.optimizer)? Start with a fresh optimizer state.")
  return out


def _drop_upcycle(experts: dict, fraction: float, rng: jax.Array) -> dict:
  """Re-initialises `fraction` of each expert's hidden units: columns of wi* [E, D, F], rows of wo [E, F, D],
  from normals with each dense matrix's mean and standard deviation."""
  num_experts, d_ff = experts["wo"].shape[:2]
  count = int(round(fraction * d_ff))
  keys = jax.random.split(rng, num_experts + len(experts))
  units = [np.asarray(jax.random.permutation(keys[e], d_ff))[:count] for e in range(num_experts)]  # E x [n]
  out = {}
  for j, (name, w) in enumerate(sorted(experts.items())):
    fresh = w[0].mean() + w[0].std() * np.asarray(jax.random.normal(keys[num_experts + j], w.shape, jnp.float32))
    w = w.copy()
    for e, hidden in enumerate(units):
      if name == "wo":
        w[e][hidden, :] = fresh[e][hidden, :]
      else:
        w[e][:, hidden] = fresh[e][:, hidden]
    out[name] = w
  return out


def upcycle(init_from: str | Path, model_config: ModelConfig | DecoderOnlyConfig, train_config: TrainConfig,
            data_config: DataConfig = DataConfig(), mesh_config: MeshConfig = MeshConfig(),
            model_dir: str | Path = "runs/upcycled", router_stddev: float = 0.02, reinit_fraction: float = 0.0,
            operative_config: str = "", show_progress: bool = True, continue_data: bool = False,
            carry_optimizer_state: bool = False) -> dict:
  """Upcycles the dense model in `init_from` (a run directory, its best/, or a switchx.save directory) into
  `model_config` and trains it with `train_config` from a fresh optimizer state. continue_data: the data starts
  where the dense run's checkpoint left it (the same corpus and settings; a run directory only), so the upcycled
  model sees new text as the dense model would have; otherwise from the beginning. carry_optimizer_state: start
  from the dense run's optimizer state (upcycle_optimizer_state; the same optimizer), not a fresh one.
  Re-running resumes."""
  loaded = restore.load_model(init_from, with_optimizer_state=carry_optimizer_state)
  check_upcyclable(loaded.config, model_config, f"the model in {init_from}")
  if carry_optimizer_state and loaded.opt_state is None:
    raise ValueError(f"carry_optimizer_state: {init_from} holds no optimizer state (a switchx.save or transformers "
                     "directory); give the dense run's directory, or start with a fresh optimizer state.")
  if continue_data and loaded.data_state is None:
    raise ValueError(f"continue_data: {init_from} holds no data position (a switchx.save or transformers "
                     "directory); give the dense run's directory, or start the data from the beginning.")
  params = upcycle_params(loaded.config, jax.device_get(loaded.params), model_config,
                          jax.random.PRNGKey(train_config.seed), router_stddev, reinit_fraction)
  return train(model_config, train_config, data_config, mesh_config, model_dir=model_dir,
               operative_config=operative_config, show_progress=show_progress, name="upcycle",
               init_params=params, init_data_state=loaded.data_state if continue_data else None,
               init_opt_state=(lambda fresh: upcycle_optimizer_state(jax.device_get(loaded.opt_state), fresh,
                                                                     model_config.moe.num_experts))
               if carry_optimizer_state else None)

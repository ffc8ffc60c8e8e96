"""Hugging Face transformers checkpoints <-> switchx.

    config, params = import_hf("switch-base-8/")  # SwitchTransformers: config.moe.semantics="transformers"
    export_hf(config, params, "out/")              # transformers' from_pretrained("out/") loads it

Reads a directory with config.json and model.safetensors (or pytorch_model.bin, read with weights_only=True;
sharded *.index.json variants too) of T5ForConditionalGeneration (T5 v1.1 gated-gelu, original T5 relu) or
SwitchTransformersForConditionalGeneration. Needs only numpy and safetensors (torch for *.bin files).

Tensor names, per stack s (encoder | decoder), block i; f is the feed-forward sub-layer (1 encoder, 2 decoder).
Torch Linear weights are [out, in], switchx kernels [in, out]:
  shared.weight [V, D]                                         token_embedder/embedding [V, D]
  s.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, H]
                                                               s/relpos_bias/rel_embedding [H, buckets]
  s.block.i.layer.0.SelfAttention.{q,k,v}.weight [H*Dh, D]     s/layers_i/{attention|self_attention}/
                                                                 {query,key,value}/kernel [D, H, Dh]
  s.block.i.layer.0.SelfAttention.o.weight [D, H*Dh]           .../out/kernel [H, Dh, D]
  decoder.block.i.layer.1.EncDecAttention.{q,k,v,o}.weight     decoder/layers_i/encoder_decoder_attention/...
  s.block.i.layer.{0,1,2}.layer_norm.weight                    s/layers_i/<norm>/scale, <norm> =
                                                                 pre_attention_layer_norm, pre_mlp_layer_norm
                                                                 (encoder); pre_self_attention_layer_norm,
                                                                 pre_cross_attention_layer_norm, pre_mlp_layer_norm
  T5: s.block.i.layer.f.DenseReluDense.{wi | wi_0, wi_1, wo}.weight   s/layers_i/mlp/{...}/kernel
  Switch dense: s.block.i.layer.f.mlp.{wi,wo}.weight                 s/layers_i/mlp/{wi,wo}/kernel
  Switch sparse: s.block.i.layer.f.mlp.router.classifier.weight [E, D]   s/layers_i/moe/router [D, E]
                 s.block.i.layer.f.mlp.experts.expert_{e}.{wi,wo}.weight (E of them)
                                                               s/layers_i/moe/experts/{wi [E, D, F], wo [E, F, D]}
  s.final_layer_norm.weight                                    s/final_layer_norm/scale
  lm_head.weight [V, D]                                        see "Output logits" below

Output logits, as transformers 5.24 computes them. Whether the decoder output is scaled by d_model**-0.5:
T5: config.scale_decoder_outputs when config.json has it, else tie_word_embeddings is not False; Switch:
tie_word_embeddings (default True). Which matrix: lm_head is tied to shared (T5 always; Switch when
tie_word_embeddings) unless the checkpoint holds an lm_head.weight that differs from shared.weight. Then:
  tied + scaled -> logits_via_embedding=True;  tied, not scaled -> logits_dense = shared.T;
  separate, not scaled -> logits_dense = lm_head.T;  separate + scaled -> logits_dense = lm_head.T * d_model**-0.5.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from switchx.config import ModelConfig, MoeConfig
from switchx.interop.param_tree import check_params, expected_shapes, flatten, listing, unflatten

ARCHITECTURES = {"t5": "T5ForConditionalGeneration",
                 "switch_transformers": "SwitchTransformersForConditionalGeneration"}
# Tensors that transformers itself ignores when loading (left over in old T5 checkpoints).
IGNORED_TENSORS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
EMBEDDING_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# transformers activation name -> switchx activation (switchx's "gelu" is the tanh approximation, gelu_new).
_ACTIVATION_FROM_HF = {"relu": "relu", "gelu_new": "gelu", "silu": "silu", "swish": "silu"}
_ACTIVATION_TO_HF = {"relu": "relu", "gelu": "gelu_new", "silu": "silu"}
# transformers' config defaults for the fields read here (a config.json may omit any of them).
_T5_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
                    layer_norm_epsilon=1e-6, feed_forward_proj="relu")
_SWITCH_DEFAULTS = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
                        layer_norm_epsilon=1e-6, expert_capacity=64, num_decoder_layers=12,
                        num_sparse_encoder_layers=3, num_sparse_decoder_layers=3, num_experts=8, router_bias=False,
                        router_jitter_noise=0.01, router_z_loss_coef=0.001, router_aux_loss_coef=0.001,
                        dense_act_fn="relu", tie_word_embeddings=True)


# --- transformers' sparse placement -----------------------------------------------------------------------
def transformers_sparse_layers(num_layers: int, num_sparse_layers: int) -> tuple[int, ...]:
  """The sparse blocks transformers' SwitchTransformersStack builds: step = num_layers // num_sparse_layers
  (num_layers when num_sparse_layers is 0); block i is sparse when step == 1 or i % step == 1; none when
  step == 0. Note num_sparse_layers=0 still makes block 1 sparse when num_layers >= 2 (and block 0 when 1)."""
  step = num_layers // num_sparse_layers if num_sparse_layers > 0 else num_layers
  if step <= 0:
    return ()
  return tuple(i for i in range(num_layers) if step == 1 or i % step == 1)


def transformers_num_sparse_layers(layers: tuple[int, ...], num_layers: int, field: str) -> int:
  """A num_sparse_*_layers value for which transformers builds exactly `layers`; ValueError if none does."""
  for count in (len(layers), *range(num_layers + 2)):
    if transformers_sparse_layers(num_layers, count) == tuple(layers):
      return count
  layouts = sorted({transformers_sparse_layers(num_layers, n) for n in range(num_layers + 2)})
  raise ValueError(
      f"ModelConfig.{field} = layers {tuple(layers)} of {num_layers}: transformers' SwitchTransformers cannot "
      "place sparse layers there. It makes block i sparse when i % step == 1 with step = num_layers // "
      "num_sparse_layers (every step-th block from block 1), all blocks when step == 1, none when step == 0; "
      f"the layouts it can build for {num_layers} layers are {layouts}. Choose one of them (e.g. 'every:2' = "
      "blocks 1, 3, 5, ...), or save with switchx.save instead.")


# --- reading ------------------------------------------------------------------------------------------------
def read_hf_config(path: str) -> dict:
  """config.json of a transformers model directory."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} is not a directory; pass the directory holding config.json and the "
                            "model weights (what save_pretrained writes).")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{path!r} has no config.json; is it a transformers model directory?")
  with open(config_path) as f:
    return json.load(f)


def _model_type(hf: dict, path: str) -> str:
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ValueError(f"{path}/config.json: model_type {model_type!r} is not supported; switchx imports "
                     f"model_type 't5' ({ARCHITECTURES['t5']}) and 'switch_transformers' "
                     f"({ARCHITECTURES['switch_transformers']}).")
  architectures = hf.get("architectures") or [ARCHITECTURES[model_type]]
  if ARCHITECTURES[model_type] not in architectures:
    raise ValueError(f"{path}/config.json: architectures {architectures} are not supported; switchx imports "
                     f"{ARCHITECTURES[model_type]} (an encoder-decoder with its language-model head).")
  return model_type


def _float32(array, name: str) -> np.ndarray:
  array = np.asarray(array)
  if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
    raise ValueError(f"tensor {name} has dtype {array.dtype}; expected floating-point weights.")
  return array.astype(np.float32)


def _read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
  import safetensors.numpy

  tensors = {}
  for file in files:
    for name, array in safetensors.numpy.load_file(file).items():
      tensors[name] = _float32(array, name)
  return tensors


def _read_torch_bin(files: list[str]) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ValueError(f"{files[0]} is a torch pickle; reading it needs torch (pip install -e '.[interop]'), or "
                     "convert the checkpoint to model.safetensors.") from e
  tensors = {}
  for file in files:
    state = torch.load(file, map_location="cpu", weights_only=True)  # tensors only: no arbitrary unpickling
    for name, value in state.items():
      if not isinstance(value, torch.Tensor):
        raise ValueError(f"{file}: entry {name!r} is a {type(value).__name__}, not a tensor.")
      tensors[name] = _float32(value.detach().to(torch.float32).numpy(), name)
  return tensors


def read_hf_tensors(path: str) -> dict[str, np.ndarray]:
  """{name: float32 array} from model.safetensors, pytorch_model.bin or their sharded *.index.json forms."""
  for weights, reader in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_torch_bin)):
    single, index = os.path.join(path, weights), os.path.join(path, weights + ".index.json")
    if os.path.isfile(single):
      return reader([single])
    if os.path.isfile(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      return reader([os.path.join(path, shard) for shard in shards])
  raise FileNotFoundError(f"{path!r} has no model.safetensors or pytorch_model.bin (nor a sharded "
                          "*.index.json); save the model with save_pretrained or download its weights.")


def _activation(hf_name: str, gated: bool, source: str) -> str:
  act = _ACTIVATION_FROM_HF.get(hf_name)
  if act is None:
    raise ValueError(f"{source}: activation {hf_name!r} is not supported; switchx has relu, gelu_new (its "
                     f"'gelu', the tanh approximation) and silu. The exact-erf 'gelu' differs from gelu_new.")
  return f"gated-{act}" if gated else act


def _config_from_hf(hf: dict, model_type: str, logits_via_embedding: bool, source: str) -> ModelConfig:
  """The switchx config of a transformers config.json (logits tying decided by the caller from the tensors)."""
  defaults = _T5_DEFAULTS if model_type == "t5" else _SWITCH_DEFAULTS
  get = lambda key: hf.get(key) if hf.get(key) is not None else defaults.get(key)
  if model_type == "t5":
    proj = get("feed_forward_proj")
    parts = proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    activation = _activation("gelu_new" if proj == "gated-gelu" else parts[-1], gated, source)
  else:
    if get("router_bias"):
      raise ValueError(f"{source}: router_bias=True is not supported (switchx routers have no bias).")
    act = get("dense_act_fn")
    if act.startswith("gated-"):
      raise ValueError(f"{source}: dense_act_fn {act!r}: transformers' SwitchTransformers has no gated "
                       "feed-forward layer, so such a checkpoint cannot be a transformers model.")
    activation = _activation(act, False, source)
  num_layers = get("num_layers")
  num_decoder_layers = hf.get("num_decoder_layers", defaults.get("num_decoder_layers"))
  if num_decoder_layers is None:  # transformers: "symmetry"
    num_decoder_layers = num_layers
  fields = dict(vocab_size=get("vocab_size"), d_model=get("d_model"), num_heads=get("num_heads"),
                head_dim=get("d_kv"), d_ff=get("d_ff"), num_encoder_layers=num_layers,
                num_decoder_layers=num_decoder_layers, activation=activation, dropout_rate=get("dropout_rate"),
                relative_attention_num_buckets=get("relative_attention_num_buckets"),
                relative_attention_max_distance=get("relative_attention_max_distance"),
                logits_via_embedding=logits_via_embedding, layer_norm_epsilon=get("layer_norm_epsilon"))
  try:
    if model_type == "switch_transformers":
      fields.update(
          encoder_sparse=transformers_sparse_layers(num_layers, get("num_sparse_encoder_layers")),
          decoder_sparse=transformers_sparse_layers(num_decoder_layers, get("num_sparse_decoder_layers")),
          moe=MoeConfig(num_experts=get("num_experts"), semantics="transformers",
                        expert_capacity=get("expert_capacity"), jitter_noise=float(get("router_jitter_noise")),
                        load_balance_loss_coef=get("router_aux_loss_coef"),
                        router_z_loss_coef=get("router_z_loss_coef")))
    return ModelConfig(**fields)
  except ValueError as e:
    raise ValueError(f"{source}: cannot be expressed as a switchx config: {e}") from e


# --- the tensor table ---------------------------------------------------------------------------------------
# How a switchx parameter relates to its transformers tensor(s):
#   "same": identical; "linear": [in, out] <-> [out, in]; "heads_in": [D, H, Dh] <-> [H*Dh, D];
#   "heads_out": [H, Dh, D] <-> [D, H*Dh]; "experts": [E, in, out] <-> E tensors [out, in].
_INPUT_DIMS = {"linear": 1, "heads_in": 1, "heads_out": 2, "experts": 1}


def _hf_shapes(kind: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
  if kind == "same":
    return [shape]
  if kind == "experts":
    return [(shape[2], shape[1])] * shape[0]
  n = _INPUT_DIMS[kind]
  return [(math.prod(shape[n:]), math.prod(shape[:n]))]


def _to_switchx(kind: str, arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
  if kind == "same":
    return arrays[0]
  if kind == "experts":
    return np.stack([a.T for a in arrays])
  return np.ascontiguousarray(arrays[0].T).reshape(shape)


def _to_hf(kind: str, array: np.ndarray) -> list[np.ndarray]:
  if kind == "same":
    return [array]
  if kind == "experts":
    return [np.ascontiguousarray(a.T) for a in array]
  n = _INPUT_DIMS[kind]
  return [np.ascontiguousarray(array.reshape(math.prod(array.shape[:n]), -1).T)]


def _tensor_table(config: ModelConfig, model_type: str) -> list[tuple[str, list[str], str]]:
  """(switchx path, transformers tensor names, kind) for every parameter except the output logits."""
  rows = [("token_embedder/embedding", ["shared.weight"], "same")]
  gated = config.activation.startswith("gated-")
  wi = ["wi_0", "wi_1"] if gated else ["wi"]
  for stack, num_layers, sparse in (("encoder", config.num_encoder_layers, config.encoder_sparse_layers),
                                    ("decoder", config.num_decoder_layers, config.decoder_sparse_layers)):
    rows.append((f"{stack}/relpos_bias/rel_embedding",
                 [f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], "linear"))
    if stack == "encoder":
      attentions = [("attention", "layer.0.SelfAttention")]
      norms = ["pre_attention_layer_norm", "pre_mlp_layer_norm"]
    else:
      attentions = [("self_attention", "layer.0.SelfAttention"), ("encoder_decoder_attention",
                                                                 "layer.1.EncDecAttention")]
      norms = ["pre_self_attention_layer_norm", "pre_cross_attention_layer_norm", "pre_mlp_layer_norm"]
    ff = len(norms) - 1  # index of the feed-forward sub-layer
    for i in range(num_layers):
      ours, theirs = f"{stack}/layers_{i}", f"{stack}.block.{i}"
      for name, hf_name in attentions:
        for proj, hf_proj in (("query", "q"), ("key", "k"), ("value", "v")):
          rows.append((f"{ours}/{name}/{proj}/kernel", [f"{theirs}.{hf_name}.{hf_proj}.weight"], "heads_in"))
        rows.append((f"{ours}/{name}/out/kernel", [f"{theirs}.{hf_name}.o.weight"], "heads_out"))
      for j, norm in enumerate(norms):
        rows.append((f"{ours}/{norm}/scale", [f"{theirs}.layer.{j}.layer_norm.weight"], "same"))
      mlp = f"{theirs}.layer.{ff}.{'DenseReluDense' if model_type == 't5' else 'mlp'}"
      if i in sparse:
        rows.append((f"{ours}/moe/router", [f"{mlp}.router.classifier.weight"], "linear"))
        for w in (*wi, "wo"):
          names = [f"{mlp}.experts.expert_{e}.{w}.weight" for e in range(config.moe.num_experts)]
          rows.append((f"{ours}/moe/experts/{w}", names, "experts"))
      else:
        for w in (*wi, "wo"):
          rows.append((f"{ours}/mlp/{w}/kernel", [f"{mlp}.{w}.weight"], "linear"))
    rows.append((f"{stack}/final_layer_norm/scale", [f"{stack}.final_layer_norm.weight"], "same"))
  return rows


# --- import -------------------------------------------------------------------------------------------------
def _output_logits(hf: dict, model_type: str, tensors: dict, source: str) -> tuple[bool, np.ndarray | None]:
  """(logits_via_embedding, logits_dense kernel [D, V] or None), reproducing transformers 5.24 (module doc)."""
  shared = tensors.get("shared.weight")
  if model_type == "t5":
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings") is not False)
    tied_by_config = True  # T5Config always sets tie_word_embeddings=True
  else:
    scaled = tied_by_config = bool(hf.get("tie_word_embeddings", True))
  lm_head = tensors.pop("lm_head.weight", None)
  if shared is None:
    return scaled, None  # reported as a missing tensor with the others
  if lm_head is None and not tied_by_config:
    raise ValueError(f"{source}: missing tensor lm_head.weight: tie_word_embeddings is false, so the checkpoint "
                     "must hold a separate output projection.")
  if lm_head is not None and lm_head.shape != shared.shape:
    raise ValueError(f"{source}: tensor lm_head.weight has shape {lm_head.shape}, expected {shared.shape} "
                     "(vocab_size, d_model).")
  separate = lm_head is not None and not (tied_by_config and np.array_equal(lm_head, shared))
  if not separate:
    return (True, None) if scaled else (False, np.ascontiguousarray(shared.T))
  kernel = np.ascontiguousarray(lm_head.T)
  if scaled:  # transformers scales the decoder output, then projects with the separate lm_head
    kernel = kernel * np.float32(shared.shape[1] ** -0.5)
  return False, kernel


def import_hf(path: str) -> tuple[ModelConfig, dict]:
  """(config, params) of a transformers T5 / SwitchTransformers directory; raises before returning anything
  when a tensor is missing, unexpected or mis-shaped. Switch models come with semantics="transformers"."""
  hf = read_hf_config(path)
  model_type = _model_type(hf, path)
  source = os.path.join(path, "config.json")
  tensors = read_hf_tensors(path)
  for name in IGNORED_TENSORS:
    tensors.pop(name, None)
  for name in EMBEDDING_ALIASES:  # transformers ties them to shared; switchx has one embedding
    alias = tensors.pop(name, None)
    if alias is not None and "shared.weight" in tensors and not np.array_equal(alias, tensors["shared.weight"]):
      raise ValueError(f"{path}: tensor {name} differs from shared.weight; switchx shares one token embedding "
                       "between encoder, decoder and (tied) output, so it cannot represent this model.")
  logits_via_embedding, logits_kernel = _output_logits(hf, model_type, tensors, path)
  config = _config_from_hf(hf, model_type, logits_via_embedding, source)
  expected = expected_shapes(config)

  flat, missing, wrong = {}, [], []
  for ours, names, kind in _tensor_table(config, model_type):
    absent = [n for n in names if n not in tensors]
    if absent:
      missing += absent
      continue
    arrays = [tensors.pop(n) for n in names]
    row_wrong = [f"{name} has shape {array.shape}, config.json implies {shape}"
                 for name, array, shape in zip(names, arrays, _hf_shapes(kind, expected[ours]))
                 if array.shape != shape]
    wrong += row_wrong
    if not row_wrong:
      flat[ours] = _to_switchx(kind, arrays, expected[ours])
  problems = []
  if missing:
    problems.append(f"missing tensors: {listing(missing)}")
  if tensors:
    problems.append(f"unexpected tensors: {listing(tensors)}")
  if wrong:
    problems.append("shape mismatches: " + "; ".join(wrong[:8]))
  if problems:
    raise ValueError(f"{path}: the weights do not match config.json ({'; '.join(problems)}). Is config.json "
                     "the one saved with these weights?")
  if logits_kernel is not None:
    flat["decoder/logits_dense/kernel"] = logits_kernel
  params = unflatten(flat)
  check_params(config, params, path)
  return config, params


# --- export -------------------------------------------------------------------------------------------------
def _hf_config(config: ModelConfig, expert_capacity: int | None) -> dict:
  """transformers config.json fields for `config`; ValueError when transformers cannot represent it."""
  if config.num_encoder_layers < 1 or config.num_decoder_layers < 1:
    raise ValueError("export_hf: transformers' T5 / SwitchTransformers need at least one encoder and one decoder "
                     f"layer; this config has {config.num_encoder_layers} and {config.num_decoder_layers}.")
  t5_layout = dict(position_embedding="relative", norm="rms", use_bias=False, scale_embeddings=False,
                   rescale_tied_logits=True)
  differs = [f"{k}={getattr(config, k)!r}" for k, v in t5_layout.items() if getattr(config, k) != v]
  if differs:
    raise ValueError(f"export_hf: {', '.join(differs)}: transformers' T5 / SwitchTransformers have T5's layout "
                     f"({', '.join(f'{k}={v!r}' for k, v in t5_layout.items())}); an NLLB-MoE-shaped model exports "
                     "through `switchx convert` (NllbMoeForConditionalGeneration).")
  gated = config.activation.startswith("gated-")
  act = _ACTIVATION_TO_HF[config.activation.removeprefix("gated-")]
  hf = dict(vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.kv_dim, d_ff=config.d_ff,
            num_layers=config.num_encoder_layers, num_decoder_layers=config.num_decoder_layers,
            num_heads=config.num_heads, relative_attention_num_buckets=config.relative_attention_num_buckets,
            relative_attention_max_distance=config.relative_attention_max_distance,
            dropout_rate=config.dropout_rate, layer_norm_epsilon=config.layer_norm_epsilon,
            tie_word_embeddings=config.logits_via_embedding, is_encoder_decoder=True, pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0, dtype="float32")
  if not config.is_sparse:
    proj = "gated-gelu" if config.activation == "gated-gelu" else f"{'gated-' if gated else ''}{act}"
    return dict(architectures=[ARCHITECTURES["t5"]], model_type="t5", feed_forward_proj=proj, **hf)

  moe = config.moe
  if gated:
    raise ValueError(f"export_hf: activation {config.activation!r}: transformers' SwitchTransformers has no gated "
                     "feed-forward layer (its dense and expert MLPs are wi -> act -> wo); use relu, gelu or silu.")
  if moe.router != "tokens_choose" or moe.top_k != 1:
    raise ValueError(f"export_hf: router={moe.router!r}, top_k={moe.top_k}: transformers' SwitchTransformers "
                     "routes each token to its top-1 expert only.")
  if moe.route_by != "token":
    raise ValueError(f"export_hf: MoeConfig.route_by={moe.route_by!r}: transformers' SwitchTransformers routes each "
                     "token by its own input; `switchx extract` a task first, or keep the switchx format.")
  if config.expert_d_ff != config.d_ff:
    raise ValueError(f"export_hf: MoeConfig.expert_d_ff={moe.expert_d_ff} differs from d_ff={config.d_ff}; "
                     "transformers' experts use d_ff.")
  capacity = expert_capacity if expert_capacity is not None else moe.expert_capacity
  if capacity is None:
    raise ValueError("export_hf: transformers' SwitchTransformers routes each sequence with a fixed "
                     "expert_capacity; set MoeConfig.expert_capacity or pass export_hf(..., expert_capacity=N) "
                     "(e.g. the tokens per sequence, so nothing is dropped).")
  return dict(
      architectures=[ARCHITECTURES["switch_transformers"]], model_type="switch_transformers",
      dense_act_fn=act, num_experts=moe.num_experts, expert_capacity=int(capacity),
      num_sparse_encoder_layers=transformers_num_sparse_layers(config.encoder_sparse_layers,
                                                               config.num_encoder_layers, "encoder_sparse"),
      num_sparse_decoder_layers=transformers_num_sparse_layers(config.decoder_sparse_layers,
                                                               config.num_decoder_layers, "decoder_sparse"),
      router_bias=False, router_dtype="float32", router_jitter_noise=moe.jitter_noise,
      router_z_loss_coef=moe.router_z_loss_coef, router_aux_loss_coef=moe.load_balance_loss_coef, **hf)


def transformers_config(config: ModelConfig, expert_capacity: int | None = None) -> dict:
  """The transformers config.json fields (T5 or SwitchTransformers) describing `config`'s architecture."""
  return _hf_config(config, expert_capacity)


def export_hf(config: ModelConfig, params, path: str, expert_capacity: int | None = None) -> None:
  """Writes `path`/config.json and model.safetensors for transformers: SwitchTransformersForConditionalGeneration
  when the config has sparse layers, T5ForConditionalGeneration otherwise. `expert_capacity` overrides
  config.moe.expert_capacity (transformers needs one). Raises, writing nothing, when transformers cannot
  represent the config (placement, gated experts, top-k > 1, ...)."""
  import safetensors.numpy

  hf = _hf_config(config, expert_capacity)
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  check_params(config, unflatten(flat), "export_hf params")
  model_type = hf["model_type"]
  tensors = {}
  for ours, names, kind in _tensor_table(config, model_type):
    tensors.update(zip(names, _to_hf(kind, flat[ours])))
  shared = tensors["shared.weight"]
  if not config.logits_via_embedding:
    tensors["lm_head.weight"] = np.ascontiguousarray(flat["decoder/logits_dense/kernel"].T)
    if model_type == "switch_transformers":
      # Untied SwitchTransformers keeps separate encoder / decoder embeddings: store them, or transformers would
      # initialise them randomly.
      tensors.update({name: shared.copy() for name in EMBEDDING_ALIASES})

  os.makedirs(path, exist_ok=True)
  stale = [f for f in os.listdir(path) if f.startswith(("pytorch_model", "model.safetensors.index", "model-"))]
  if stale:
    raise ValueError(f"export_hf: {path!r} already holds other weight files ({listing(stale)}) that transformers "
                     "could load instead; export into an empty directory.")
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  safetensors.numpy.save_file({k: v.astype(np.float32) for k, v in tensors.items()},
                              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

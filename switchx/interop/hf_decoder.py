"""transformers' decoder-only MoE models <-> switchx's DecoderOnly (models/decoder_only.py): MixtralForCausalLM,
OlmoeForCausalLM, Qwen2MoeForCausalLM (Qwen1.5-MoE) and Qwen3MoeForCausalLM, in and out.

    config, params = from_hf(hf_model.config, hf_model.state_dict())     # or switchx.load("<save_pretrained dir>")

Mixtral's layer maps onto switchx's names as follows (W: a torch Linear weight [out, in]; switchx kernels are
[in, out], split by head where they feed heads):
    model.embed_tokens                     token_embedder/embedding [V, D]
    layers.i.input_layernorm               layers_i/pre_attention_layer_norm/scale
    layers.i.self_attn.{q,k,v}_proj        layers_i/attention/{query,key,value}/kernel [D, H|Hkv, Dh]
    layers.i.self_attn.o_proj              layers_i/attention/out/kernel [H, Dh, D]
    layers.i.post_attention_layernorm      layers_i/pre_mlp_layer_norm/scale
    layers.i.mlp.gate                      layers_i/moe/router [D, E] (softmax over all experts, top-k, gates
                                           renormalised: MoeConfig.normalize_gates; no capacity: dispatch dropless)
    layers.i.mlp.experts.gate_up_proj      layers_i/moe/experts/wi_0 (gate) and wi_1 (up) [E, D, F]
    layers.i.mlp.experts.down_proj         layers_i/moe/experts/wo [E, F, D]
    (or per expert: block_sparse_moe.experts.j.w1 / w3 / w2, the layout of the released checkpoints)
    model.norm, lm_head                    final_norm/scale, logits_dense/kernel [D, V]
The other families add: OLMoE's q_norm / k_norm over all heads (qk_norm="full") and Qwen3's per head
("head"), attention/{query,key}_norm/scale; Qwen1.5-MoE's q/k/v biases (attention/*/bias [H|Hkv, Dh]), its
shared expert (mlp.shared_expert.{gate,up,down}_proj -> moe/shared_expert/{wi_0,wi_1,wo}, mlp.shared_expert_gate
-> moe/shared_expert_gate [D, 1]) and Qwen's dense layers (mlp.{gate,up,down}_proj -> mlp/{wi_0,wi_1,wo}).
"""

from __future__ import annotations

import json
import os
import types

import numpy as np

from switchx.config import DecoderOnlyConfig, MoeConfig


FAMILIES = {"mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM"}


def decoder_config(hf, model_type: str) -> DecoderOnlyConfig:
  """A transformers config (attribute access: a PretrainedConfig or a namespace of config.json) of one of
  FAMILIES -> DecoderOnlyConfig. Every family routes every token (no capacity: dispatch dropless), top-k of a
  softmax over all experts, the k gates renormalised where the family does (Mixtral always; the others'
  norm_topk_prob)."""
  if model_type not in FAMILIES:
    raise ValueError(f"model_type {model_type!r}: switchx imports the decoder-only families {', '.join(FAMILIES)}.")
  if getattr(hf, "sliding_window", None) and getattr(hf, "use_sliding_window", True):
    raise ValueError(f"{model_type}: sliding_window={hf.sliding_window}: switchx's attention sees the whole causal "
                     "prefix; convert a model without a sliding window.")
  if getattr(hf, "clip_qkv", None) is not None:
    raise ValueError(f"{model_type}: clip_qkv={hf.clip_qkv} is not supported (OLMoE-1B-7B has none).")
  if getattr(hf, "attention_bias", False):
    raise ValueError(f"{model_type}: attention_bias=True is not supported.")
  if hf.hidden_act != "silu":
    raise ValueError(f"{model_type}: hidden_act={hf.hidden_act!r}: switchx maps these experts to gated-silu "
                     "(SwiGLU) only.")
  rope = getattr(hf, "rope_parameters", None) or {"rope_type": "default", "rope_theta": hf.rope_theta}
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"rope_type {rope['rope_type']!r}: switchx implements the default rotary embedding only.")
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
  layers = hf.num_hidden_layers
  if model_type == "mixtral":
    experts, normalize, sparse, expert_d_ff = hf.num_local_experts, True, "all", None
  else:
    experts, normalize = hf.num_experts, bool(hf.norm_topk_prob)
    expert_d_ff = getattr(hf, "moe_intermediate_size", None)
    sparse = "all"
    if model_type in ("qwen2_moe", "qwen3_moe"):    # Qwen: layer i sparse when (i + 1) % step == 0, not listed dense
      step, dense = hf.decoder_sparse_step, set(getattr(hf, "mlp_only_layers", None) or ())
      sparse = tuple(i for i in range(layers) if (i + 1) % step == 0 and i not in dense)
  shared = getattr(hf, "shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
  moe = MoeConfig(num_experts=experts, top_k=hf.num_experts_per_tok, normalize_gates=normalize,
                  dispatch="dropless", train_capacity_factor=0.0, eval_capacity_factor=0.0,
                  expert_d_ff=expert_d_ff, shared_expert_d_ff=shared or 0,
                  load_balance_loss_coef=hf.router_aux_loss_coef,
                  jitter_noise=getattr(hf, "router_jitter_noise", 0.0) or 0.0)
  return DecoderOnlyConfig(
      vocab_size=hf.vocab_size, d_model=hf.hidden_size, num_layers=layers, num_heads=hf.num_attention_heads,
      num_kv_heads=hf.num_key_value_heads, head_dim=head_dim, d_ff=hf.intermediate_size, activation="gated-silu",
      rope_theta=float(rope["rope_theta"]), norm_epsilon=hf.rms_norm_eps,
      tie_embeddings=bool(hf.tie_word_embeddings), sparse=sparse, moe=moe,
      qk_norm={"olmoe": "full", "qwen3_moe": "head"}.get(model_type, "none"),
      qkv_bias=bool(getattr(hf, "qkv_bias", True)) if model_type == "qwen2_moe" else False)


def decoder_params(state_dict: dict, config: DecoderOnlyConfig) -> dict:
  """A state dict of one of FAMILIES (torch tensors or arrays; transformers 5's fused experts or the released
  checkpoints' per-expert Linears) -> switchx parameters (float32 numpy)."""
  sd = {name: _numpy(value) for name, value in state_dict.items()}
  d, heads, kv_heads, dh = config.d_model, config.num_heads, config.num_kv_heads, config.kv_dim
  params = {"token_embedder": {"embedding": sd["model.embed_tokens.weight"]},
            "final_norm": {"scale": sd["model.norm.weight"]}}
  sparse = set(config.sparse_layers)
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    a = p + "self_attn."
    attention = {"query": {"kernel": sd[a + "q_proj.weight"].T.reshape(d, heads, dh)},
                 "key": {"kernel": sd[a + "k_proj.weight"].T.reshape(d, kv_heads, dh)},
                 "value": {"kernel": sd[a + "v_proj.weight"].T.reshape(d, kv_heads, dh)},
                 "out": {"kernel": sd[a + "o_proj.weight"].T.reshape(heads, dh, d)}}
    if config.qkv_bias:
      for ours, theirs, n in (("query", "q_proj", heads), ("key", "k_proj", kv_heads), ("value", "v_proj", kv_heads)):
        attention[ours]["bias"] = sd[a + theirs + ".bias"].reshape(n, dh)
    if config.qk_norm != "none":
      attention["query_norm"] = {"scale": sd[a + "q_norm.weight"]}
      attention["key_norm"] = {"scale": sd[a + "k_norm.weight"]}
    layer = {"pre_attention_layer_norm": {"scale": sd[p + "input_layernorm.weight"]}, "attention": attention,
             "pre_mlp_layer_norm": {"scale": sd[p + "post_attention_layernorm.weight"]}}
    if i in sparse:
      layer["moe"] = _moe_params(sd, p, config)
    else:
      layer["mlp"] = _mlp_params(sd, p + "mlp.")
    params[f"layers_{i}"] = layer
  if not config.tie_embeddings:
    params["logits_dense"] = {"kernel": sd["lm_head.weight"].T}
  return _contiguous(params)


def _mlp_params(sd: dict, prefix: str) -> dict:
  """gate_proj / up_proj / down_proj Linears -> an MlpBlock's wi_0 / wi_1 / wo kernels."""
  return {"wi_0": {"kernel": sd[prefix + "gate_proj.weight"].T}, "wi_1": {"kernel": sd[prefix + "up_proj.weight"].T},
          "wo": {"kernel": sd[prefix + "down_proj.weight"].T}}


def _moe_params(sd: dict, p: str, config: DecoderOnlyConfig) -> dict:
  e, f = config.moe.num_experts, config.expert_d_ff
  if p + "mlp.experts.gate_up_proj" in sd:                      # transformers 5: fused [E, 2F, D] and [E, D, F]
    gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
    router = sd[p + "mlp.gate.weight"]
  elif p + "block_sparse_moe.gate.weight" in sd:                # Mixtral's released layout: w1 / w3 / w2 per expert
    m = p + "block_sparse_moe."
    stack = lambda w: np.stack([sd[f"{m}experts.{j}.{w}.weight"] for j in range(e)])
    gate_up, down, router = np.concatenate([stack("w1"), stack("w3")], 1), stack("w2"), sd[m + "gate.weight"]
  else:                                                         # OLMoE / Qwen released: gate / up / down per expert
    m = p + "mlp."
    stack = lambda w: np.stack([sd[f"{m}experts.{j}.{w}.weight"] for j in range(e)])
    gate_up, down, router = (np.concatenate([stack("gate_proj"), stack("up_proj")], 1), stack("down_proj"),
                             sd[m + "gate.weight"])
  moe = {"router": router.T, "experts": {"wi_0": gate_up[:, :f].transpose(0, 2, 1),
                                         "wi_1": gate_up[:, f:].transpose(0, 2, 1), "wo": down.transpose(0, 2, 1)}}
  if config.moe.shared_expert_d_ff:
    moe["shared_expert"] = _mlp_params(sd, p + "mlp.shared_expert.")
    moe["shared_expert_gate"] = {"kernel": sd[p + "mlp.shared_expert_gate.weight"].T}
  return moe


def from_hf(hf_config, state_dict: dict) -> tuple[DecoderOnlyConfig, dict]:
  """A transformers model's config and state dict (one of FAMILIES) -> (DecoderOnlyConfig, params)."""
  config = decoder_config(hf_config, hf_config.model_type)
  return config, decoder_params(state_dict, config)


# --- directories (what save_pretrained writes): switchx.load / switchx convert ------------------------------
MODEL_TYPES = FAMILIES
_DEFAULTS = dict(head_dim=None, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, rope_parameters=None,
                 sliding_window=None, tie_word_embeddings=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0,
                 norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=(), clip_qkv=None,
                 attention_bias=False, qkv_bias=True)


def import_dir(path: str) -> tuple[DecoderOnlyConfig, dict]:
  """A transformers directory of one of FAMILIES (config.json + safetensors) -> (config, params)."""
  from switchx.interop.hf import read_hf_config, read_hf_tensors
  hf = read_hf_config(path)
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(f"{path}/config.json: model_type {model_type!r} is not a decoder-only model switchx imports "
                     f"({', '.join(FAMILIES)}).")
  config = decoder_config(types.SimpleNamespace(**{**_DEFAULTS, **hf}), model_type)
  tensors = read_hf_tensors(path)
  try:
    return config, decoder_params(tensors, config)
  except KeyError as missing:
    raise ValueError(f"{path}: the weights have no tensor {missing.args[0]} that config.json implies; is the "
                     "directory complete?") from None


def export_family(config: DecoderOnlyConfig) -> str:
  """The transformers family that represents `config`: its q/k norm, biases and shared expert decide."""
  if config.qk_norm == "full":
    return "olmoe"
  if config.qk_norm == "head":
    return "qwen3_moe"
  if config.qkv_bias or config.moe.shared_expert_d_ff:
    return "qwen2_moe"
  return "mixtral"


def export_dir(config: DecoderOnlyConfig, params, path: str) -> None:
  """Writes `path`/config.json and model.safetensors that transformers' <Family>ForCausalLM.from_pretrained loads
  (export_family picks Mixtral, OLMoE, Qwen1.5-MoE or Qwen3-MoE; the released checkpoints' layout: one Linear
  per expert). Fails, writing nothing, where the family cannot represent the config."""
  import safetensors.numpy
  moe, family = config.moe, export_family(config)
  sparse = config.sparse_layers
  problems = [why for bad, why in [
      (config.activation != "gated-silu", "activation='gated-silu'"),
      (moe.router != "tokens_choose" or moe.expert_map is not None, "tokens_choose routing over unmerged experts"),
      (family == "mixtral" and not moe.normalize_gates, "normalize_gates=True (Mixtral renormalises)"),
      (family in ("mixtral", "olmoe") and sparse != tuple(range(config.num_layers)), "every layer sparse"),
      (family == "mixtral" and moe.expert_d_ff not in (None, config.d_ff), "expert_d_ff = d_ff"),
      (family == "olmoe" and moe.expert_d_ff not in (None, config.d_ff), "expert_d_ff = d_ff"),
      (family == "qwen2_moe" and not (config.qkv_bias and moe.shared_expert_gate), "q/k/v biases and a gated "
       "shared expert (Qwen1.5-MoE)"),
      (family != "qwen2_moe" and (config.qkv_bias or moe.shared_expert_d_ff), "no q/k/v bias or shared expert"),
      (moe.bias_balance_rate > 0 or moe.routed_scaling_factor != 1.0, "no selection bias or gate scaling")] if bad]
  if problems:
    raise ValueError(f"export as {FAMILIES[family]} needs {', '.join(problems)}.")
  hf = dict(architectures=[FAMILIES[family]], model_type=family, vocab_size=config.vocab_size,
            hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads, head_dim=config.kv_dim,
            hidden_act="silu", rms_norm_eps=config.norm_epsilon, rope_theta=config.rope_theta,
            num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.load_balance_loss_coef,
            tie_word_embeddings=config.tie_embeddings, torch_dtype="float32")
  if family == "mixtral":
    hf.update(num_local_experts=moe.num_experts, sliding_window=None, router_jitter_noise=moe.jitter_noise)
  else:
    hf.update(num_experts=moe.num_experts, norm_topk_prob=moe.normalize_gates)
  if family in ("qwen2_moe", "qwen3_moe"):
    hf.update(moe_intermediate_size=config.expert_d_ff, decoder_sparse_step=1, use_sliding_window=False,
              mlp_only_layers=[i for i in range(config.num_layers) if i not in sparse])
  if family == "qwen2_moe":
    hf.update(shared_expert_intermediate_size=moe.shared_expert_d_ff, qkv_bias=True)
  if family == "olmoe":
    hf.update(clip_qkv=None)
  p = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
  d = config.d_model
  tensors = {"model.embed_tokens.weight": p["token_embedder/embedding"], "model.norm.weight": p["final_norm/scale"]}
  if not config.tie_embeddings:
    tensors["lm_head.weight"] = p["logits_dense/kernel"].T
  linear = lambda prefix, ours: {prefix + "gate_proj.weight": p[ours + "wi_0/kernel"].T,
                                 prefix + "up_proj.weight": p[ours + "wi_1/kernel"].T,
                                 prefix + "down_proj.weight": p[ours + "wo/kernel"].T}
  for i in range(config.num_layers):
    ours, theirs = f"layers_{i}/", f"model.layers.{i}."
    attn, a = ours + "attention/", theirs + "self_attn."
    tensors.update({
        theirs + "input_layernorm.weight": p[ours + "pre_attention_layer_norm/scale"],
        theirs + "post_attention_layernorm.weight": p[ours + "pre_mlp_layer_norm/scale"],
        a + "q_proj.weight": p[attn + "query/kernel"].reshape(d, -1).T,
        a + "k_proj.weight": p[attn + "key/kernel"].reshape(d, -1).T,
        a + "v_proj.weight": p[attn + "value/kernel"].reshape(d, -1).T,
        a + "o_proj.weight": p[attn + "out/kernel"].reshape(-1, d).T})
    if config.qkv_bias:
      tensors.update({a + f"{x}_proj.bias": p[attn + f"{name}/bias"].reshape(-1)
                      for x, name in (("q", "query"), ("k", "key"), ("v", "value"))})
    if config.qk_norm != "none":
      tensors.update({a + "q_norm.weight": p[attn + "query_norm/scale"],
                      a + "k_norm.weight": p[attn + "key_norm/scale"]})
    if i not in sparse:
      tensors.update(linear(theirs + "mlp.", ours + "mlp/"))
      continue
    gate = theirs + ("block_sparse_moe." if family == "mixtral" else "mlp.")
    tensors[gate + "gate.weight"] = p[ours + "moe/router"].T
    for j in range(moe.num_experts):
      expert, w = f"{gate}experts.{j}.", lambda name: p[ours + f"moe/experts/{name}"][j].T
      if family == "mixtral":
        tensors.update({expert + "w1.weight": w("wi_0"), expert + "w3.weight": w("wi_1"),
                        expert + "w2.weight": w("wo")})
      else:
        tensors.update({expert + "gate_proj.weight": w("wi_0"), expert + "up_proj.weight": w("wi_1"),
                        expert + "down_proj.weight": w("wo")})
    if moe.shared_expert_d_ff:
      tensors.update(linear(theirs + "mlp.shared_expert.", ours + "moe/shared_expert/"))
      tensors[theirs + "mlp.shared_expert_gate.weight"] = p[ours + "moe/shared_expert_gate/kernel"].T
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def flatten_params(params) -> dict:
  import flax.traverse_util
  return flax.traverse_util.flatten_dict(params, sep="/")


def _numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):
    value = value.detach().float().cpu().numpy()
  return np.asarray(value, np.float32)


def _contiguous(tree):
  if isinstance(tree, dict):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree)

"""transformers' decoder-only MoE models -> switchx's DecoderOnly (models/decoder_only.py): MixtralForCausalLM.

    config, params = from_mixtral(hf_model.config, hf_model.state_dict())

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
"""

from __future__ import annotations

import json
import os
import types

import numpy as np

from switchx.config import DecoderOnlyConfig, MoeConfig


def mixtral_config(hf) -> DecoderOnlyConfig:
  """A transformers MixtralConfig -> DecoderOnlyConfig (every token routed: no capacity, as Mixtral)."""
  if getattr(hf, "sliding_window", None):
    raise ValueError(f"MixtralConfig.sliding_window={hf.sliding_window}: switchx's attention sees the whole "
                     "causal prefix; convert a model without a sliding window (Mixtral-8x7B and 8x22B have none).")
  if hf.hidden_act != "silu":
    raise ValueError(f"MixtralConfig.hidden_act={hf.hidden_act!r}: switchx maps Mixtral's experts to gated-silu "
                     "(SwiGLU) only.")
  rope = getattr(hf, "rope_parameters", None) or {"rope_type": "default", "rope_theta": hf.rope_theta}
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"rope_type {rope['rope_type']!r}: switchx implements the default rotary embedding only.")
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
  moe = MoeConfig(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok, normalize_gates=True,
                  dispatch="dropless", train_capacity_factor=0.0, eval_capacity_factor=0.0,
                  load_balance_loss_coef=hf.router_aux_loss_coef, jitter_noise=hf.router_jitter_noise)
  return DecoderOnlyConfig(vocab_size=hf.vocab_size, d_model=hf.hidden_size, num_layers=hf.num_hidden_layers,
                           num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
                           head_dim=head_dim, d_ff=hf.intermediate_size, activation="gated-silu",
                           rope_theta=float(rope["rope_theta"]), norm_epsilon=hf.rms_norm_eps,
                           tie_embeddings=bool(hf.tie_word_embeddings), sparse="all", moe=moe)


def mixtral_params(state_dict: dict, config: DecoderOnlyConfig) -> dict:
  """A MixtralForCausalLM state dict (torch tensors or arrays) -> switchx parameters (float32 numpy)."""
  sd = {name: _numpy(value) for name, value in state_dict.items()}
  d, heads, kv_heads, dh, f = config.d_model, config.num_heads, config.num_kv_heads, config.kv_dim, config.d_ff
  params = {"token_embedder": {"embedding": sd["model.embed_tokens.weight"]},
            "final_norm": {"scale": sd["model.norm.weight"]}}
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    attention = {"query": {"kernel": sd[p + "self_attn.q_proj.weight"].T.reshape(d, heads, dh)},
                 "key": {"kernel": sd[p + "self_attn.k_proj.weight"].T.reshape(d, kv_heads, dh)},
                 "value": {"kernel": sd[p + "self_attn.v_proj.weight"].T.reshape(d, kv_heads, dh)},
                 "out": {"kernel": sd[p + "self_attn.o_proj.weight"].T.reshape(heads, dh, d)}}
    if p + "mlp.experts.gate_up_proj" in sd:
      gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]   # [E, 2F, D], [E, D, F]
      router = sd[p + "mlp.gate.weight"]
    else:   # the released checkpoints' layout: one Linear per expert and matrix
      e = config.moe.num_experts
      moe = p + "block_sparse_moe."
      stack = lambda w: np.stack([sd[f"{moe}experts.{j}.{w}.weight"] for j in range(e)])
      gate_up, down, router = np.concatenate([stack("w1"), stack("w3")], 1), stack("w2"), sd[moe + "gate.weight"]
    experts = {"wi_0": gate_up[:, :f].transpose(0, 2, 1), "wi_1": gate_up[:, f:].transpose(0, 2, 1),
               "wo": down.transpose(0, 2, 1)}
    params[f"layers_{i}"] = {
        "pre_attention_layer_norm": {"scale": sd[p + "input_layernorm.weight"]},
        "attention": attention,
        "pre_mlp_layer_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
        "moe": {"router": router.T, "experts": experts}}
  if not config.tie_embeddings:
    params["logits_dense"] = {"kernel": sd["lm_head.weight"].T}
  return _contiguous(params)


def from_mixtral(hf_config, state_dict: dict) -> tuple[DecoderOnlyConfig, dict]:
  config = mixtral_config(hf_config)
  return config, mixtral_params(state_dict, config)


# --- directories (what save_pretrained writes): switchx.load / switchx convert ------------------------------
MODEL_TYPES = {"mixtral": "MixtralForCausalLM"}
_MIXTRAL_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                         rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, num_experts_per_tok=2,
                         num_local_experts=8, router_aux_loss_coef=0.001, router_jitter_noise=0.0,
                         tie_word_embeddings=False, rope_parameters=None)


def import_dir(path: str) -> tuple[DecoderOnlyConfig, dict]:
  """A transformers MixtralForCausalLM directory (config.json + safetensors) -> (config, params)."""
  from switchx.interop.hf import read_hf_config, read_hf_tensors
  hf = read_hf_config(path)
  if hf.get("model_type") not in MODEL_TYPES:
    raise ValueError(f"{path}/config.json: model_type {hf.get('model_type')!r} is not a decoder-only model switchx "
                     f"imports ({', '.join(MODEL_TYPES)}).")
  fields = types.SimpleNamespace(**{**_MIXTRAL_DEFAULTS, **hf})
  config = mixtral_config(fields)
  tensors = read_hf_tensors(path)
  try:
    return config, mixtral_params(tensors, config)
  except KeyError as missing:
    raise ValueError(f"{path}: the weights have no tensor {missing.args[0]} that config.json implies; is the "
                     "directory complete?") from None


def export_dir(config: DecoderOnlyConfig, params, path: str) -> None:
  """Writes `path`/config.json and model.safetensors that transformers' MixtralForCausalLM.from_pretrained loads
  (the released checkpoints' layout: one Linear per expert). Fails, writing nothing, where Mixtral cannot
  represent the config."""
  import safetensors.numpy
  moe = config.moe
  problems = [why for bad, why in [
      (config.sparse_layers != tuple(range(config.num_layers)), "every layer sparse (sparse='all')"),
      (config.activation != "gated-silu", "activation='gated-silu'"),
      (not moe.normalize_gates or moe.router != "tokens_choose", "top-k with normalize_gates=True"),
      (moe.shared_expert_d_ff > 0, "no shared expert"),
      (moe.expert_d_ff not in (None, config.d_ff), "expert_d_ff = d_ff"),
      (moe.bias_balance_rate > 0 or moe.routed_scaling_factor != 1.0, "no selection bias or gate scaling")] if bad]
  if problems:
    raise ValueError(f"export to MixtralForCausalLM needs {', '.join(problems)}.")
  hf = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=config.vocab_size,
            hidden_size=config.d_model, intermediate_size=config.d_ff, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads, head_dim=config.kv_dim,
            hidden_act="silu", rms_norm_eps=config.norm_epsilon, rope_theta=config.rope_theta,
            sliding_window=None, num_experts_per_tok=moe.top_k, num_local_experts=moe.num_experts,
            router_aux_loss_coef=moe.load_balance_loss_coef, router_jitter_noise=moe.jitter_noise,
            tie_word_embeddings=config.tie_embeddings, torch_dtype="float32")
  p = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
  d = config.d_model
  tensors = {"model.embed_tokens.weight": p["token_embedder/embedding"], "model.norm.weight": p["final_norm/scale"]}
  if not config.tie_embeddings:
    tensors["lm_head.weight"] = p["logits_dense/kernel"].T
  for i in range(config.num_layers):
    ours, theirs = f"layers_{i}/", f"model.layers.{i}."
    attn = ours + "attention/"
    tensors.update({
        theirs + "input_layernorm.weight": p[ours + "pre_attention_layer_norm/scale"],
        theirs + "post_attention_layernorm.weight": p[ours + "pre_mlp_layer_norm/scale"],
        theirs + "self_attn.q_proj.weight": p[attn + "query/kernel"].reshape(d, -1).T,
        theirs + "self_attn.k_proj.weight": p[attn + "key/kernel"].reshape(d, -1).T,
        theirs + "self_attn.v_proj.weight": p[attn + "value/kernel"].reshape(d, -1).T,
        theirs + "self_attn.o_proj.weight": p[attn + "out/kernel"].reshape(-1, d).T,
        theirs + "block_sparse_moe.gate.weight": p[ours + "moe/router"].T})
    for j in range(moe.num_experts):
      expert = f"{theirs}block_sparse_moe.experts.{j}."
      tensors[expert + "w1.weight"] = p[ours + "moe/experts/wi_0"][j].T
      tensors[expert + "w3.weight"] = p[ours + "moe/experts/wi_1"][j].T
      tensors[expert + "w2.weight"] = p[ours + "moe/experts/wo"][j].T
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

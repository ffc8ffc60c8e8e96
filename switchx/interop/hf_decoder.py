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


def _numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):
    value = value.detach().float().cpu().numpy()
  return np.asarray(value, np.float32)


def _contiguous(tree):
  if isinstance(tree, dict):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree)

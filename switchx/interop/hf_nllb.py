"""NLLB-MoE (Costa-jussa et al. 2022; transformers' NllbMoeForConditionalGeneration) <-> switchx's encoder-decoder.

NLLB-MoE is a fairseq transformer: token embeddings x sqrt(D) plus fixed sinusoidal positions, pre-norm LayerNorm
(with bias), biases on every projection, ReLU FFNs, and every `sparse_step`-th layer ((i + 1) % step == 0) a top-2
MoE layer: a softmax over all experts, the two best gates renormalised after capacity (a token that lost its 2nd
expert keeps gate 1 on its 1st), second choices queued behind every first choice, expert outputs scaled by
1 - moe_token_dropout at eval (dropped out when training), tied output logits without T5's rescaling. Each of
those is a ModelConfig / MoeConfig field (position_embedding, norm, use_bias, scale_embeddings,
rescale_tied_logits, normalize_kept_gates, expert_output_dropout), so the model is the same EncoderDecoder and the
same MoE layer (every dispatch path) as Switch.

    config, params = import_dir("nllb_moe_dir/")          # what switchx.load does for model_type "nllb-moe"
    export_dir(config, params, "out/")                     # NllbMoeForConditionalGeneration.from_pretrained("out/")

Conventions that differ, and what the conversion does about them:
  * Token ids: switchx pads with 0; NLLB's <s> is 0 and <pad> is 1. Both trade places on the way in and out
    (rows 0 and 1 of the embedding swap), so NLLB id 1 is switchx's padding and NLLB id 0 is switchx's 1; feed
    swap_ids(ids) and read logits[..., swap_ids(arange(V))].
  * Attention: T5-style attention does not scale its logits; NLLB's 1 / sqrt(head_dim) goes into the query
    projection's kernel and bias.
  * Capacity: eval has no capacity (moe_eval_capacity_token_fraction 1.0 -> eval_capacity_factor 0); training
    uses train_capacity_factor 1.0 (transformers' 2 * ceil(T / E) when expert_capacity is unset) per routing
    group; transformers' fixed expert_capacity (64) over the whole batch is not carried.
  * transformers 5.x's NllbMoeExperts runs every token's first choice through expert 1 and its second through
    expert 0 (it one-hots the already one-hot top-1 mask); switchx follows the model's definition (and
    transformers 4.x), so compare against a transformers with that loop fixed (tests/test_nllb.py does).
  * Decoding: NLLB starts the decoder with </s> (2) and forces a language token; switchx.decode starts from 0,
    so a converted NLLB-MoE scores and trains here, but translation with its tokenizer is not wired up.
"""

from __future__ import annotations

import json
import os
import types

import numpy as np

from switchx.config import ModelConfig, MoeConfig

ARCHITECTURE = "NllbMoeForConditionalGeneration"
MODEL_TYPE = "nllb-moe"
# transformers' NllbMoeConfig defaults, for config.json files that leave fields out.
DEFAULTS = dict(vocab_size=128112, max_position_embeddings=1024, encoder_layers=12, encoder_ffn_dim=4096,
                encoder_attention_heads=16, decoder_layers=12, decoder_ffn_dim=4096, decoder_attention_heads=16,
                activation_function="relu", d_model=1024, dropout=0.1, scale_embedding=True, router_bias=False,
                num_experts=128, expert_capacity=64, encoder_sparse_step=4, decoder_sparse_step=4,
                router_z_loss_coef=0.001, router_aux_loss_coef=0.001, second_expert_policy="all",
                normalize_router_prob_before_dropping=False, batch_prioritized_routing=False,
                moe_eval_capacity_token_fraction=1.0, moe_token_dropout=0.2, pad_token_id=1,
                tie_word_embeddings=True)


def swap_ids(ids):
  """NLLB token ids <-> switchx's: 0 and 1 trade places (switchx pads with 0, NLLB with 1). Its own inverse."""
  ids = np.asarray(ids)
  return np.where(ids == 0, 1, np.where(ids == 1, 0, ids))


def _layout(step: int) -> str:
  return f"every:{step}" if step > 0 else "none"


def nllb_config(hf) -> ModelConfig:
  """transformers' NllbMoeConfig (or its config.json fields as attributes) -> ModelConfig; a clear error for what
  switchx's model cannot represent."""
  problems = [why for bad, why in [
      (hf.encoder_attention_heads != hf.decoder_attention_heads, "the same number of heads in encoder and decoder"),
      (hf.encoder_ffn_dim != hf.decoder_ffn_dim, "the same FFN size in encoder and decoder"),
      (hf.activation_function != "relu", f"activation_function 'relu' (got {hf.activation_function!r})"),
      (hf.router_bias, "router_bias=False"),
      (hf.second_expert_policy != "all", f"second_expert_policy 'all' (got {hf.second_expert_policy!r}: its "
       "sampling rules are not switchx's GShard 'random')"),
      (not hf.tie_word_embeddings, "tied word embeddings"),
      (hf.pad_token_id != 1, f"pad_token_id 1 (got {hf.pad_token_id})"),
      (hf.d_model % hf.encoder_attention_heads, "heads dividing d_model")] if bad]
  if problems:
    raise ValueError(f"NLLB-MoE config: switchx imports models with {', '.join(problems)}.")
  fraction = hf.moe_eval_capacity_token_fraction
  moe = MoeConfig(
      num_experts=hf.num_experts, top_k=2, normalize_gates=True,
      normalize_kept_gates=not hf.normalize_router_prob_before_dropping,
      batch_prioritized=bool(hf.batch_prioritized_routing), train_capacity_factor=1.0,
      # eval capacity ceil(fraction * T) = ceil(factor * 2 * T / E); fraction >= 1 (or <= 0: training's): none
      eval_capacity_factor=0.0 if fraction >= 1 or fraction <= 0 else fraction * hf.num_experts / 2,
      min_capacity=1, load_balance_loss_coef=hf.router_aux_loss_coef, router_z_loss_coef=hf.router_z_loss_coef,
      expert_output_dropout=hf.moe_token_dropout)
  return ModelConfig(
      vocab_size=hf.vocab_size, d_model=hf.d_model, num_heads=hf.encoder_attention_heads, head_dim=None,
      d_ff=hf.encoder_ffn_dim, num_encoder_layers=hf.encoder_layers, num_decoder_layers=hf.decoder_layers,
      activation="relu", dropout_rate=hf.dropout, logits_via_embedding=True, rescale_tied_logits=False,
      position_embedding="sinusoidal", norm="layer", layer_norm_epsilon=1e-5, use_bias=True,
      scale_embeddings=bool(hf.scale_embedding), init_scale=1.0, encoder_sparse=_layout(hf.encoder_sparse_step),
      decoder_sparse=_layout(hf.decoder_sparse_step), moe=moe)


def _attention(sd: dict, prefix: str, config: ModelConfig) -> dict:
  h, dh, d = config.num_heads, config.kv_dim, config.d_model
  scale = {"q": dh ** -0.5, "k": 1.0, "v": 1.0}            # NLLB scales the logits; T5-style attention does not
  out = {name: {"kernel": sd[f"{prefix}{x}_proj.weight"].T.reshape(d, h, dh) * scale[x],
                "bias": sd[f"{prefix}{x}_proj.bias"].reshape(h, dh) * scale[x]}
         for x, name in (("q", "query"), ("k", "key"), ("v", "value"))}
  out["out"] = {"kernel": sd[prefix + "out_proj.weight"].T.reshape(h, dh, d), "bias": sd[prefix + "out_proj.bias"]}
  return out


def _norm(sd: dict, prefix: str) -> dict:
  return {"scale": sd[prefix + "weight"], "bias": sd[prefix + "bias"]}


def _ffn(sd: dict, prefix: str, sparse: bool, config: ModelConfig) -> dict:
  if not sparse:
    return {"mlp": {"wi": {"kernel": sd[prefix + "fc1.weight"].T, "bias": sd[prefix + "fc1.bias"]},
                    "wo": {"kernel": sd[prefix + "fc2.weight"].T, "bias": sd[prefix + "fc2.bias"]}}}
  expert = lambda j, name: sd[f"{prefix}experts.expert_{j}.{name}"]
  experts = range(config.moe.num_experts)
  return {"moe": {"router": sd[prefix + "router.classifier.weight"].T,
                  "experts": {"wi": np.stack([expert(j, "fc1.weight").T for j in experts]),
                              "wi_bias": np.stack([expert(j, "fc1.bias") for j in experts]),
                              "wo": np.stack([expert(j, "fc2.weight").T for j in experts]),
                              "wo_bias": np.stack([expert(j, "fc2.bias") for j in experts])}}}


def _embedding(sd: dict) -> np.ndarray:
  for name in ("model.shared.weight", "model.encoder.embed_tokens.weight", "lm_head.weight"):
    if name in sd:
      return sd[name]
  raise KeyError("model.shared.weight")


def nllb_params(state_dict: dict, config: ModelConfig) -> dict:
  """transformers' state dict (numpy or torch values) -> switchx params."""
  sd = {k: np.asarray(v.detach().float().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
        for k, v in state_dict.items()}
  table = _embedding(sd)
  params = {"token_embedder": {"embedding": table[swap_ids(np.arange(len(table)))]}}
  enc_sparse, dec_sparse = set(config.encoder_sparse_layers), set(config.decoder_sparse_layers)
  encoder = {"final_layer_norm": _norm(sd, "model.encoder.layer_norm.")}
  for i in range(config.num_encoder_layers):
    p = f"model.encoder.layers.{i}."
    encoder[f"layers_{i}"] = {"pre_attention_layer_norm": _norm(sd, p + "self_attn_layer_norm."),
                              "attention": _attention(sd, p + "self_attn.", config),
                              "pre_mlp_layer_norm": _norm(sd, p + "ff_layer_norm."),
                              **_ffn(sd, p + "ffn.", i in enc_sparse, config)}
  decoder = {"final_layer_norm": _norm(sd, "model.decoder.layer_norm.")}
  for i in range(config.num_decoder_layers):
    p = f"model.decoder.layers.{i}."
    decoder[f"layers_{i}"] = {"pre_self_attention_layer_norm": _norm(sd, p + "self_attn_layer_norm."),
                              "self_attention": _attention(sd, p + "self_attn.", config),
                              "pre_cross_attention_layer_norm": _norm(sd, p + "cross_attention_layer_norm."),
                              "encoder_decoder_attention": _attention(sd, p + "cross_attention.", config),
                              "pre_mlp_layer_norm": _norm(sd, p + "ff_layer_norm."),
                              **_ffn(sd, p + "ffn.", i in dec_sparse, config)}
  params.update(encoder=encoder, decoder=decoder)
  return params


def from_hf(hf_config, state_dict: dict) -> tuple[ModelConfig, dict]:
  """A transformers NllbMoe model's config and state dict -> (ModelConfig, params)."""
  config = nllb_config(hf_config)
  return config, nllb_params(state_dict, config)


def import_dir(path: str) -> tuple[ModelConfig, dict]:
  """A transformers NLLB-MoE directory (config.json + safetensors or pytorch_model.bin) -> (config, params)."""
  from switchx.interop.hf import read_hf_config, read_hf_tensors
  hf = read_hf_config(path)
  if hf.get("model_type") != MODEL_TYPE:
    raise ValueError(f"{path}/config.json: model_type {hf.get('model_type')!r} is not {MODEL_TYPE!r}.")
  config = nllb_config(types.SimpleNamespace(**{**DEFAULTS, **hf}))
  try:
    return config, nllb_params(read_hf_tensors(path), config)
  except KeyError as missing:
    raise ValueError(f"{path}: the weights have no tensor {missing.args[0]} that config.json implies; is the "
                     "directory complete?") from None


def _step(layers: tuple[int, ...], num_layers: int) -> int | None:
  """NLLB's sparse_step for a switchx layout, or None when (i + 1) % step == 0 cannot describe it."""
  if not layers:
    return 0
  step = layers[0] + 1
  return step if layers == tuple(i for i in range(num_layers) if (i + 1) % step == 0) else None


def export_dir(config: ModelConfig, params, path: str) -> None:
  """Writes `path`/config.json and model.safetensors that NllbMoeForConditionalGeneration.from_pretrained loads.
  Fails, writing nothing, where NLLB-MoE cannot represent the config."""
  import safetensors.numpy
  from switchx.interop.hf_decoder import flatten_params
  moe = config.moe
  enc_step = _step(config.encoder_sparse_layers, config.num_encoder_layers)
  dec_step = _step(config.decoder_sparse_layers, config.num_decoder_layers)
  problems = [why for bad, why in [
      (config.position_embedding != "sinusoidal", "position_embedding='sinusoidal'"),
      (config.norm != "layer" or not config.use_bias, "norm='layer' and use_bias=True"),
      (not config.logits_via_embedding or config.rescale_tied_logits, "tied logits without T5's rescaling"),
      (config.activation != "relu", "activation='relu'"),
      (enc_step is None or dec_step is None, "sparse layers every N-th ((i + 1) % N == 0)"),
      (moe.router != "tokens_choose" or moe.top_k != 2 or not moe.normalize_gates or moe.second_expert_policy != "all",
       "top-2 tokens_choose routing with normalised gates and second_expert_policy='all'"),
      (moe.expert_map is not None or moe.shared_expert_d_ff or moe.expert_d_ff not in (None, config.d_ff),
       "unmerged experts of size d_ff and no shared expert"),
      (moe.bias_balance_rate > 0 or moe.routed_scaling_factor != 1.0 or moe.route_by != "token",
       "token routing without selection bias or gate scaling")] if bad]
  if problems:
    raise ValueError(f"export as {ARCHITECTURE} needs {', '.join(problems)}.")
  hf = dict(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, vocab_size=config.vocab_size,
            d_model=config.d_model, encoder_layers=config.num_encoder_layers,
            decoder_layers=config.num_decoder_layers, encoder_attention_heads=config.num_heads,
            decoder_attention_heads=config.num_heads, encoder_ffn_dim=config.d_ff, decoder_ffn_dim=config.d_ff,
            activation_function="relu", dropout=config.dropout_rate, scale_embedding=config.scale_embeddings,
            num_experts=moe.num_experts, encoder_sparse_step=enc_step, decoder_sparse_step=dec_step,
            router_aux_loss_coef=moe.load_balance_loss_coef, router_z_loss_coef=moe.router_z_loss_coef,
            normalize_router_prob_before_dropping=not moe.normalize_kept_gates,
            batch_prioritized_routing=moe.batch_prioritized, moe_token_dropout=moe.expert_output_dropout,
            moe_eval_capacity_token_fraction=1.0 if moe.eval_capacity_factor <= 0
            else min(moe.eval_capacity_factor * 2 / moe.num_experts, 1.0),
            tie_word_embeddings=True, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
            torch_dtype="float32")
  p = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
  d, dh = config.d_model, config.kv_dim
  table = p["token_embedder/embedding"]
  tensors = {"model.shared.weight": table[swap_ids(np.arange(len(table)))]}

  def attention(theirs, ours):
    for x, name in (("q", "query"), ("k", "key"), ("v", "value")):
      scale = dh ** 0.5 if x == "q" else 1.0
      tensors[f"{theirs}{x}_proj.weight"] = p[f"{ours}{name}/kernel"].reshape(d, -1).T * scale
      tensors[f"{theirs}{x}_proj.bias"] = p[f"{ours}{name}/bias"].reshape(-1) * scale
    tensors[theirs + "out_proj.weight"] = p[ours + "out/kernel"].reshape(-1, d).T
    tensors[theirs + "out_proj.bias"] = p[ours + "out/bias"]

  def norm(theirs, ours):
    tensors[theirs + "weight"], tensors[theirs + "bias"] = p[ours + "scale"], p[ours + "bias"]

  def ffn(theirs, ours, sparse):
    if not sparse:
      for fc, w in (("fc1", "wi"), ("fc2", "wo")):
        tensors[f"{theirs}{fc}.weight"] = p[f"{ours}mlp/{w}/kernel"].T
        tensors[f"{theirs}{fc}.bias"] = p[f"{ours}mlp/{w}/bias"]
      return
    tensors[theirs + "router.classifier.weight"] = p[ours + "moe/router"].T
    experts = lambda name: p[ours + "moe/experts/" + name]
    for j in range(moe.num_experts):
      e = f"{theirs}experts.expert_{j}."
      tensors.update({e + "fc1.weight": experts("wi")[j].T, e + "fc1.bias": experts("wi_bias")[j],
                      e + "fc2.weight": experts("wo")[j].T, e + "fc2.bias": experts("wo_bias")[j]})

  for stack, layers, sparse in (("encoder", config.num_encoder_layers, set(config.encoder_sparse_layers)),
                                ("decoder", config.num_decoder_layers, set(config.decoder_sparse_layers))):
    norm(f"model.{stack}.layer_norm.", f"{stack}/final_layer_norm/")
    for i in range(layers):
      theirs, ours = f"model.{stack}.layers.{i}.", f"{stack}/layers_{i}/"
      if stack == "encoder":
        norm(theirs + "self_attn_layer_norm.", ours + "pre_attention_layer_norm/")
        attention(theirs + "self_attn.", ours + "attention/")
      else:
        norm(theirs + "self_attn_layer_norm.", ours + "pre_self_attention_layer_norm/")
        attention(theirs + "self_attn.", ours + "self_attention/")
        norm(theirs + "cross_attention_layer_norm.", ours + "pre_cross_attention_layer_norm/")
        attention(theirs + "cross_attention.", ours + "encoder_decoder_attention/")
      norm(theirs + "ff_layer_norm.", ours + "pre_mlp_layer_norm/")
      ffn(theirs + "ffn.", ours, i in sparse)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

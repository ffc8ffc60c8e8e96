"""Data-aware quantization of expert weights (GPTQ, Frantar et al. 2022; used for MoEs by QMoE, arXiv 2310.16795):
each expert's matrices are quantized one input row at a time, and the rounding error of each row is pushed onto
the rows not yet quantized, weighted by the inverse Hessian of the layer's squared output error on the tokens
that expert actually receives.

    calibration = expert_inputs(config, params, batches)        # {layer: [E, N, D]} the tokens each expert gets
    qparams = quantize_experts_gptq(config, params, calibration, bits=2)   # ternary; 4 and 8 too

For an expert matrix W [D_in, D_out] and its inputs X [N, D_in]: H = X^T X (+ a small damping), U the upper
Cholesky factor of H^-1; for i = 0 .. D_in-1: q_i = round(W_i / s) clipped to [-qmax, qmax],
e = (W_i - q_i s) / U_ii, W_{i+1:} -= U_{i, i+1:}^T e. The scales s (one per output column, as quantize.py) are
chosen before, per column, among clipping ratios of max|W| by the smallest rounding error (low bit widths gain
most from clipping). The second matrix (wo) is quantized against the hidden activations computed with the
already-quantized first one(s), as GPTQ proceeds layer by layer. bits 2 means ternary codes {-1, 0, 1}.
"""

from __future__ import annotations

import dataclasses

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from switchx.config import ModelConfig
from switchx.nn.mlp import activation_fn
from switchx.quantize import SCALE_DTYPE, Quantized, pack_codes, qmax

CLIP_RATIOS = np.linspace(0.3, 1.0, 15)


def expert_inputs(config: ModelConfig, params, batches) -> dict[tuple[str, ...], np.ndarray]:
  """{path of a MoE layer: [E, N, D] float32}: the tokens each expert receives (eval mode, nothing dropped),
  gathered over `batches` (model-input dicts); slots left empty are dropped, so N varies per expert and the
  rows are padded with zeros (which add nothing to X^T X)."""
  from switchx.models.encoder_decoder import EncoderDecoder
  from switchx.train.step import model_inputs
  moe = dataclasses.replace(config.moe, eval_capacity_factor=0.0, expert_capacity=None, dispatch="einsum",
                            num_group_partitions=1)
  model = EncoderDecoder(config.replace(moe=moe, dropout_rate=0.0))
  apply = jax.jit(lambda p, b: model.apply({"params": p}, **b, train=False, mutable=["intermediates"])[1])
  gathered: dict[tuple[str, ...], list[np.ndarray]] = {}
  for batch in batches:
    sown = apply(params, {k: jnp.asarray(v) for k, v in model_inputs(batch).items()})["intermediates"]
    for path, (value,) in flax.traverse_util.flatten_dict(sown).items():
      if path[-1] == "expert_inputs":
        x = np.asarray(value, np.float32)                                         # [E, G, C, D]
        gathered.setdefault(path[:-1], []).append(x.reshape(x.shape[0], -1, x.shape[-1]))
  return {path: np.concatenate(parts, axis=1) for path, parts in gathered.items()}


def choose_scales(w: np.ndarray, bits: int) -> np.ndarray:
  """[1, D_out] float16: per output column the clipped max|W| / qmax with the smallest rounding error."""
  top = np.abs(w).max(axis=0, keepdims=True)                                       # [1, D_out]
  best, best_error = None, None
  for ratio in CLIP_RATIOS:
    s = (top * ratio / qmax(bits)).astype(SCALE_DTYPE).astype(np.float64)
    safe = np.where(s > 0, s, 1.0)
    error = np.square(w - np.clip(np.rint(w / safe), -qmax(bits), qmax(bits)) * s).sum(axis=0, keepdims=True)
    if best is None:
      best, best_error = s, error
    else:
      better = error < best_error
      best, best_error = np.where(better, s, best), np.where(better, error, best_error)
  return best.astype(SCALE_DTYPE)


def gptq_matrix(w: np.ndarray, x: np.ndarray, bits: int, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
  """w [D_in, D_out], x [N, D_in] -> (codes int8 [D_in, D_out], scale float16 [1, D_out])."""
  w = np.asarray(w, np.float64).copy()
  x = np.asarray(x, np.float64)
  h = x.T @ x                                                                      # [D_in, D_in]
  dead = np.diag(h) == 0                                                           # inputs never seen
  h[dead, dead] = 1.0
  w[dead] = 0.0
  h += damp * np.mean(np.diag(h)) * np.eye(len(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T                                      # upper: H^-1 = U^T U
  scale = choose_scales(w, bits)
  s = np.where(scale > 0, scale.astype(np.float64), 1.0)[0]                       # [D_out]
  codes = np.zeros(w.shape, np.int8)
  for i in range(w.shape[0]):
    q = np.clip(np.rint(w[i] / s), -qmax(bits), qmax(bits))
    codes[i] = q
    error = (w[i] - q * s) / u[i, i]                                               # [D_out]
    w[i + 1:] -= np.outer(u[i, i + 1:], error)
  return codes, scale


def quantize_experts_gptq(config: ModelConfig, params, calibration: dict, bits: int, damp: float = 0.01):
  """The parameter tree with every MoE layer's expert matrices quantized by GPTQ on `calibration`
  (expert_inputs' output); Quantized leaves as quantize.quantize_experts makes, so saving, loading and serving
  are the same."""
  act, gated = activation_fn(config.activation)
  flat = flax.traverse_util.flatten_dict(params)
  for layer, inputs in calibration.items():
    experts = layer + ("experts",)
    names = ("wi_0", "wi_1") if gated else ("wi",)
    quantized = {name: [] for name in names + ("wo",)}
    for e in range(inputs.shape[0]):
      x = inputs[e][np.abs(inputs[e]).sum(-1) > 0]                                # the expert's real tokens
      first = {}
      for name in names:
        codes, scale = gptq_matrix(flat[experts + (name,)][e], x, bits, damp)
        quantized[name].append((codes, scale))
        first[name] = codes.astype(np.float32) * scale.astype(np.float32)        # what serving will compute
      hidden = (np.asarray(act(x @ first["wi_0"])) * (x @ first["wi_1"]) if gated
                else np.asarray(act(x @ first["wi"])))                            # [N, F]
      quantized["wo"].append(gptq_matrix(flat[experts + ("wo",)][e], hidden, bits, damp))
    for name, per_expert in quantized.items():
      codes = np.stack([c for c, _ in per_expert])                                 # [E, D_in, D_out]
      scale = np.stack([s for _, s in per_expert])                                 # [E, 1, D_out]
      flat[experts + (name,)] = Quantized(pack_codes(codes, bits), scale, bits, codes.shape)
  return flax.traverse_util.unflatten_dict(flat)

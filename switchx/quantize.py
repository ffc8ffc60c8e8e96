"""Expert weights quantized for serving: symmetric round-to-nearest per output channel, int8, int4 or ternary
(the data-aware GPTQ method: switchx/gptq.py, into the same format).

    qparams = quantize_experts(params, bits=4)    # each expert matrix [E, D_in, D_out] -> Quantized (codes, scales)
    switchx.save(config, qparams, "q4/")          # codes (int4: two per byte) and float16 scales in safetensors
    config, qparams = switchx.load("q4/")         # Quantized leaves again, as compact in memory as on disk
    switchx.logits(config, qparams, ...)          # decode / eval too: dequantize() runs inside the jitted step

All experts must sit in memory to serve a sparse model, so its size is mostly expert weights (QMoE, arXiv
2310.16795). Each expert matrix W [D_in, D_out] gets one scale per output column, s_o = max_i |W_io| / qmax
(qmax 127 for int8, 7 for int4), rounded to float16 first (the stored value), and codes q = round(W / s) in
[-qmax, qmax]; W is served as q * s, within s / 2 of the original, element by element. Everything else (attention,
embeddings, routers, norms) stays float32. `ledger` counts the bytes from shapes alone.
"""

from __future__ import annotations

import math

import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

BITS = (8, 4, 2)   # 2: ternary codes {-1, 0, 1} (qmax 1), four a byte
EXPERT_WEIGHTS = ("wi", "wi_0", "wi_1", "wo")   # the stacked expert matrices, [E, D_in, D_out]
SCALE_DTYPE = np.float16


@flax.struct.dataclass
class Quantized:
  """One stacked expert matrix [E, D_in, D_out], quantized."""

  codes: jax.Array     # int8 [E, D_in, D_out] (bits 8), or uint8 [E, D_in, ceil(D_out * bits / 8)] (4, 2: packed)
  scale: jax.Array     # float16 [E, 1, D_out]
  bits: int = flax.struct.field(pytree_node=False, default=8)
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())   # the float matrix's shape

  @property
  def dtype(self):
    return np.dtype(np.float32)   # what it dequantizes to (the loaders' checks read this)

  def dequantize(self) -> jax.Array:
    codes = unpack_codes(self.codes, self.bits, self.shape[-1])
    return codes.astype(jnp.float32) * self.scale.astype(jnp.float32)


def qmax(bits: int) -> int:
  return 2 ** (bits - 1) - 1


def quantize(w, bits: int) -> Quantized:
  """w [E, D_in, D_out] float -> Quantized (numpy, on the host: quantizing happens once, before serving)."""
  if bits not in BITS:
    raise ValueError(f"bits={bits}: switchx quantizes expert weights to one of {BITS} bits.")
  w = np.asarray(w, np.float32)
  scale = (np.abs(w).max(axis=-2, keepdims=True) / qmax(bits)).astype(SCALE_DTYPE)       # [E, 1, D_out]
  safe = np.where(scale > 0, scale.astype(np.float32), 1.0)                              # an all-zero column: code 0
  codes = np.clip(np.rint(w / safe), -qmax(bits), qmax(bits)).astype(np.int8)            # [E, D_in, D_out]
  return Quantized(pack_codes(codes, bits), scale, bits, w.shape)


def pack_codes(codes, bits: int) -> np.ndarray:
  """int8 codes [..., n] -> bits 8: themselves; bits 4 / 2: uint8 [..., ceil(n * bits / 8)], code j of a byte in
  bits j*b .. j*b + b - 1 (two's complement in b bits)."""
  codes = np.asarray(codes, np.int8)
  if bits == 8:
    return codes
  per_byte = 8 // bits
  pad = -codes.shape[-1] % per_byte
  if pad:
    codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), np.int8)], -1)
  fields = (codes.astype(np.int16) & (2 ** bits - 1)).astype(np.uint8)
  packed = np.zeros(codes.shape[:-1] + (codes.shape[-1] // per_byte,), np.uint8)
  for j in range(per_byte):
    packed |= fields[..., j::per_byte] << (j * bits)
  return packed


def unpack_codes(packed: jax.Array, bits: int, n: int) -> jax.Array:
  """pack_codes' inverse (traceable: runs inside the jitted step) -> int8 [..., n]."""
  if bits == 8:
    return packed
  per_byte, mask = 8 // bits, 2 ** bits - 1
  fields = jnp.stack([(packed >> (j * bits)) & mask for j in range(per_byte)], axis=-1).astype(jnp.int8)
  fields = fields.reshape(packed.shape[:-1] + (per_byte * packed.shape[-1],))[..., :n]
  return jnp.where(fields > mask // 2, fields - (mask + 1), fields).astype(jnp.int8)   # the field's sign


def pack_int4(codes) -> np.ndarray:
  return pack_codes(codes, 4)


def unpack_int4(packed: jax.Array, n: int) -> jax.Array:
  return unpack_codes(packed, 4, n)


def is_expert_weight(path: tuple[str, ...]) -> bool:
  return len(path) >= 2 and path[-2] == "experts" and path[-1] in EXPERT_WEIGHTS


def quantize_experts(params, bits: int):
  """The parameter tree with every expert matrix replaced by its Quantized form (the rest unchanged)."""
  flat = flax.traverse_util.flatten_dict(params)
  if not any(is_expert_weight(path) for path in flat):
    raise ValueError("these parameters have no expert weights (a dense model): switchx quantizes the experts "
                     "of a sparse model; there is nothing to quantize.")
  return flax.traverse_util.unflatten_dict(
      {path: quantize(value, bits) if is_expert_weight(path) and not isinstance(value, Quantized) else value
       for path, value in flat.items()})


def dequantize(params):
  """Every Quantized leaf as its float32 matrix; a tree without any comes back as it is. Call it inside the jitted
  function that uses the parameters, so only the codes and scales live in memory between calls."""
  is_q = lambda x: isinstance(x, Quantized)
  return jax.tree_util.tree_map(lambda x: x.dequantize() if is_q(x) else x, params, is_leaf=is_q)


def is_quantized(params) -> bool:
  return any(isinstance(x, Quantized) for x in
             jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, Quantized)))


# --- the safetensors layout: "<path>.codes" and "<path>.scale", bits and shape in the file's metadata -----------
def to_tensors(flat: dict) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """{"a/b": array or Quantized} -> (tensors, metadata) for safetensors."""
  tensors, layout = {}, {}
  for name, value in flat.items():
    if isinstance(value, Quantized):
      tensors[f"{name}.codes"] = np.asarray(value.codes)
      tensors[f"{name}.scale"] = np.asarray(value.scale)
      layout[name] = {"bits": value.bits, "shape": list(value.shape)}
    else:
      tensors[name] = np.asarray(value)
  return tensors, ({"quantized": _json(layout)} if layout else {})


def from_tensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> dict:
  """to_tensors' inverse: {"a/b": array or Quantized}."""
  import json
  layout = json.loads((metadata or {}).get("quantized", "{}"))
  flat = {name: value for name, value in tensors.items() if not name.endswith((".codes", ".scale"))}
  for name, spec in layout.items():
    try:
      codes, scale = tensors[f"{name}.codes"], tensors[f"{name}.scale"]
    except KeyError as missing:
      raise ValueError(f"the file's metadata lists {name} as quantized but it holds no {missing.args[0]}: the "
                       "file is damaged; quantize the model again (switchx quantize).") from None
    flat[name] = Quantized(codes, scale, int(spec["bits"]), tuple(spec["shape"]))
  return flat


def _json(value) -> str:
  import json
  return json.dumps(value, separators=(",", ":"))


# --- the size ledger -----------------------------------------------------------------------------------------
def ledger(shapes: dict[str, tuple[int, ...]], bits: int | None) -> dict:
  """Bytes of a model's parameters from their shapes ({"a/b/c": shape}, e.g. model_stats.param_shapes), with its
  expert matrices at `bits` (None: float32 throughout): codes, float16 scales, and float32 for the rest."""
  expert = {p: s for p, s in shapes.items() if is_expert_weight(tuple(p.split("/")))}
  total = sum(math.prod(s) for s in shapes.values())
  expert_params = sum(math.prod(s) for s in expert.values())
  if bits is None:
    code_bytes, scale_count = 4 * expert_params, 0
  else:
    per_row = lambda n: -(-n * bits // 8)
    code_bytes = sum(math.prod(s[:-1]) * per_row(s[-1]) for s in expert.values())
    scale_count = sum(s[0] * s[-1] for s in expert.values())
  scale_bytes = scale_count * np.dtype(SCALE_DTYPE).itemsize
  rest_bytes = 4 * (total - expert_params)
  total_bytes = code_bytes + scale_bytes + rest_bytes
  return {"bits": bits or 32, "total_params": total, "expert_params": expert_params,
          "expert_code_bytes": code_bytes, "scale_bytes": scale_bytes, "other_bytes": rest_bytes,
          "total_bytes": total_bytes, "bits_per_param": 8 * total_bytes / total,
          "expert_bits_per_param": 8 * (code_bytes + scale_bytes) / max(expert_params, 1)}

"""The dense T5 feed-forward block: wi -> activation (optionally gated) -> dropout -> wo (biases optional)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchx.axes import BATCH, EMBED, LENGTH, MLP
from switchx.nn.linear import DenseGeneral

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),  # T5 v1.1's gelu is the tanh approximation
    "silu": jax.nn.silu,
}


def activation_fn(name: str) -> tuple[Callable[[jax.Array], jax.Array], bool]:
  """(function, gated) for names like 'relu' or 'gated-gelu' (gated: act(x @ wi_0) * (x @ wi_1))."""
  gated = name.startswith("gated-")
  return _ACTIVATIONS[name.removeprefix("gated-")], gated


class MlpBlock(nn.Module):
  d_ff: int
  activation: str
  dropout_rate: float
  init_scale: float
  dtype: Any = jnp.float32
  use_bias: bool = False          # biases on wi / wo (NLLB-MoE's fc1 / fc2; T5: none)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    act, gated = activation_fn(self.activation)
    d_model = x.shape[-1]
    dense = lambda name, feats, axes: DenseGeneral(feats, axes, init_scale=self.init_scale,
                                                   dtype=self.dtype, use_bias=self.use_bias, name=name)
    if gated:
      h = act(dense("wi_0", self.d_ff, (EMBED, MLP))(x)) * dense("wi_1", self.d_ff, (EMBED, MLP))(x)
    else:
      h = act(dense("wi", self.d_ff, (EMBED, MLP))(x))              # [B, L, F]
    h = nn.with_logical_constraint(h, (BATCH, LENGTH, MLP))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return dense("wo", d_model, (MLP, EMBED))(h)                     # [B, L, D]

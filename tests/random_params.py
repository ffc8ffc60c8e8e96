"""Random parameters of the right shapes for any config, without compiling the model's init (which costs
several seconds on 2 cores): interop tests only need some weights to carry through a conversion."""

import numpy as np

from switchx.interop.param_tree import expected_shapes, unflatten


def random_params(config, seed: int = 0) -> dict:
  """normal(1) embedding, norm scales near 1, kernels with std 1 / sqrt(fan_in) (fan_in: every dim but the
  last; experts [E, in, out]: the middle one); float32 numpy arrays."""
  rng = np.random.RandomState(seed)
  flat = {}
  for path, shape in expected_shapes(config).items():
    if path.endswith("/scale"):
      flat[path] = 1.0 + 0.1 * rng.normal(size=shape)
    elif path == "token_embedder/embedding":
      flat[path] = rng.normal(size=shape)
    else:
      fan_in = shape[1] if "/experts/" in path else int(np.prod(shape[:-1]))
      flat[path] = rng.normal(size=shape) / np.sqrt(fan_in)
  return unflatten({path: value.astype(np.float32) for path, value in flat.items()})

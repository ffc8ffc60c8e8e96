"""switchx: Switch Transformers and sparse Mixture-of-Experts models in JAX/Flax.

    config, params = switchx.load(path)    # a switchx.save directory or a transformers T5 / Switch directory
    logits = switchx.logits(config, params, encoder_input_tokens, decoder_input_tokens)
    switchx.save(config, params, path)

These are imported on first use (switchx/api.py), so `import switchx` stays cheap.
"""

__version__ = "0.1.0"

_API = ("load", "save", "logits")


def __getattr__(name):
  if name in _API:
    from switchx import api

    return getattr(api, name)
  raise AttributeError(f"module 'switchx' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_API])

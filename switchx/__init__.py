"""switchx: Switch Transformers and sparse Mixture-of-Experts models in JAX/Flax."""

__version__ = "0.1.0"

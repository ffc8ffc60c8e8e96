"""Shared test set-up: CPU only, quiet logs, a hypothesis profile sized for 2-core CI, tiny model configs."""

import os

import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Built corpus and trained tokenizers are cached here for the session (and its child processes), never in ~.
os.environ.setdefault("SWITCHX_CACHE", tempfile.mkdtemp(prefix="switchx-test-cache-"))
# Compiled programs are cached on disk for the session: child processes (kill/resume tests, the 8-device suite)
# and repeated builds of the same tiny models then skip XLA compilation.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["SWITCHX_CACHE"], "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import functools  # noqa: E402

import flax.linen as nn  # noqa: E402
import hypothesis  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from switchx.config import ModelConfig, MoeConfig  # noqa: E402
from switchx.models.encoder_decoder import EncoderDecoder  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def tiny_config(**changes) -> ModelConfig:
  """A model small enough to compile in about a second."""
  base = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=2,
              num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16)
  base.update(changes)
  return ModelConfig(**base)


def tiny_switch_config(**moe_changes) -> ModelConfig:
  moe = dict(num_experts=4, group_size=64, train_capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=1)
  moe.update(moe_changes)
  return tiny_config(encoder_sparse="every:2", decoder_sparse="every:2", moe=MoeConfig(**moe))


@pytest.fixture
def tiny():
  return tiny_config()


# Compiling a model's init costs seconds on 2 cores (mostly its random number generation), so tests share one
# initialisation and one jitted apply per (hashable, frozen) config.
def init_params(config: ModelConfig, seed: int = 0):
  """Parameters depend only on shapes, so configs differing in routing, capacity, dtype or dropout share them."""
  moe = MoeConfig(num_experts=config.moe.num_experts, expert_d_ff=config.moe.expert_d_ff)
  return _init_params(config.replace(dtype="float32", dropout_rate=0.0, moe=moe), seed)


@functools.lru_cache(maxsize=None)
def _init_params(config: ModelConfig, seed: int):
  model = EncoderDecoder(config)
  tokens = jnp.ones((1, 4), jnp.int32)
  return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), tokens, tokens)["params"])


@functools.lru_cache(maxsize=None)
def jitted_apply(config: ModelConfig):
  """model.apply under jit, with `train` static. Eager flax runs op by op and is far slower."""
  return jax.jit(EncoderDecoder(config).apply, static_argnames=("train",))


def save_load_round_trip(config, params, directory) -> None:
  """switchx.save then switchx.load gives the same config and bit-identical parameters."""
  import numpy as np
  from switchx import api
  api.save(config, params, str(directory))
  config2, params2 = api.load(str(directory))
  assert config2 == config
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

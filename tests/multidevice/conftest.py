"""These tests need 8 (fake) devices, set before jax starts: tests/test_parallel.py runs them in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8. In the main session they are skipped."""

import jax
import pytest


def pytest_collection_modifyitems(config, items):
  if jax.device_count() >= 8:
    return
  skip = pytest.mark.skip(reason="needs 8 devices; tests/test_parallel.py runs these in a subprocess with "
                                 "XLA_FLAGS=--xla_force_host_platform_device_count=8")
  for item in items:
    if "multidevice" in str(item.fspath):
      item.add_marker(skip)

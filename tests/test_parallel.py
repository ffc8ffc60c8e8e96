"""Runs tests/multidevice/ on 8 fake CPU devices (they must be configured before jax starts, hence a
subprocess): sharded == single device for loss and gradients over five meshes, parameter placement, the
all-to-all of expert parallelism, checkpoints across meshes, `switchx plan`, and mesh errors."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_multidevice_suite_on_8_fake_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/multidevice"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  print(result.stdout[-20000:], result.stderr[-5000:])
  assert result.returncode == 0, "multi-device tests failed (output above)"
  assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]

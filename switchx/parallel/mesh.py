"""The device mesh from config, and multi-host start-up.

Launching (JAX's own multi-controller runtime; every host runs the same command):
  * TPU pod slice: `switchx train ... --mesh data=..,expert=..,model=..` on every host of the slice
    (e.g. `gcloud compute tpus tpu-vm ssh NAME --worker=all --command "..."`); jax.distributed.initialize()
    discovers the slice by itself.
  * GPU cluster: set JAX_COORDINATOR_ADDRESS=host0:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (or run under
    SLURM / Open MPI, which jax detects) and start one process per host (or per GPU).
`maybe_initialize_distributed()` calls jax.distributed.initialize when any of these is present.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh

from switchx.parallel.rules import MESH_AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; one of them may be -1 (inferred from the device count)."""

  data: int = -1
  expert: int = 1
  model: int = 1

  def __post_init__(self):
    sizes = (self.data, self.expert, self.model)
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"MeshConfig{sizes}: each axis size must be >= 1, and at most one may be -1 (inferred).")

  @classmethod
  def parse(cls, text: str) -> "MeshConfig":
    """'data=2,expert=4,model=1' (axes left out are 1, or -1 for data when nothing is given)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
      name, _, value = part.partition("=")
      if name not in MESH_AXES or not value.lstrip("-").isdigit():
        raise ValueError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES}, "
                         "e.g. data=2,expert=4,model=1.")
      sizes[name] = int(value)
    return cls(**{"data": 1, "expert": 1, "model": 1, **sizes}) if sizes else cls()

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.expert, self.model]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"cannot infer the mesh: {num_devices} devices are not divisible by the other axes' "
                         f"product {known} (mesh {self}).")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(f"mesh data={sizes[0]}, expert={sizes[1]}, model={sizes[2]} has {math.prod(sizes)} "
                       f"positions but there are {num_devices} devices; make the product equal the device "
                       "count (or set one axis to -1 to infer it).")
    return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  """A (data, expert, model) mesh with automatic (GSPMD) partitioning over the given or all devices."""
  devices = jax.devices() if devices is None else list(devices)
  shape = config.shape(len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def maybe_initialize_distributed() -> None:
  """Starts jax.distributed when the environment describes a multi-process job (no-op otherwise)."""
  markers = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")
  if any(os.environ.get(m) for m in markers) and not jax.distributed.is_initialized():
    jax.distributed.initialize()

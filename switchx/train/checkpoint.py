"""Checkpoints with orbax: atomic, asynchronous, restorable onto another mesh, verified on restore.

Each step directory holds `state` (the TrainState, written cooperatively by every process, OCDBT format) and
`meta` (JSON: the data pipeline position, the RNG seed, the step, the config fingerprint, and a fingerprint of
the state's values). Orbax writes into a temporary directory and renames it when complete, so a crash mid-save
never leaves a step that looks finished. On restore, the state's values are checked against the saved
fingerprint; a latest checkpoint that fails to read or to verify is reported and the previous one is tried.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("switchx")


class CheckpointError(RuntimeError):
  pass


@jax.jit
def _leaf_sums(leaves) -> jax.Array:
  return jnp.stack([jnp.stack([jnp.asarray(x, jnp.float32).sum(), jnp.square(jnp.asarray(x, jnp.float32)).sum()])
                    for x in leaves])


def fingerprint(tree) -> dict[str, list[float]]:
  """{leaf path: [sum, sum of squares]}: cheap to compute, sensitive to damage, independent of the container
  types (a TrainState and the plain dict orbax restores without a template give the same keys)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path) for path, _ in flat]
  sums = np.asarray(_leaf_sums([leaf for _, leaf in flat])).tolist()
  return dict(zip(names, sums))


def _matches(saved: dict, now: dict) -> bool:
  # Reduction order differs across meshes, so compare to float32 accumulation error, not bit for bit.
  return saved.keys() == now.keys() and all(
      np.allclose(saved[k], now[k], rtol=1e-4, atol=1e-4) for k in saved)


class Checkpointer:
  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Starts writing `state` (asynchronously); `meta` must be JSON-serialisable."""
    meta = dict(meta, step=int(step), fingerprint=fingerprint(state))
    self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding). Tries the given step,
    or the newest one first and then older ones, skipping (with a warning) any that fails to read or verify.
    Raises CheckpointError when checkpoints exist but none is usable: never a silent fresh start."""
    self.wait()
    candidates = [step] if step is not None else list(reversed(self.steps()))
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    problems = []
    for candidate in candidates:
      try:
        restored = self._manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        state, meta = restored["state"], restored["meta"]
        if not _matches(meta["fingerprint"], fingerprint(state)):
          raise CheckpointError("its values do not match the fingerprint saved with it (corrupted data)")
      except Exception as e:  # orbax / tensorstore raise many kinds; all mean "this step is unusable"
        message = f"checkpoint step {candidate} in {self.directory} is unusable: {type(e).__name__}: {e}"
        log.warning("%s", message[:2000])
        problems.append(message[:500])
        continue
      if problems:
        log.warning("restored the previous good checkpoint, step %d", candidate)
      return state, meta, candidate
    raise CheckpointError("no usable checkpoint; delete the damaged step directories to start afresh, or "
                          "restore a backup:\n  " + "\n  ".join(problems))

  def close(self) -> None:
    self.wait()
    self._manager.close()

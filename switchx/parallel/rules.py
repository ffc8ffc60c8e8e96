"""Logical axis rules as data: the one table that maps model axis names onto the (data, expert, model) mesh.

As in the Switch paper's setup, the expert axis also splits the batch: before dispatch every device holds a
slice of the tokens (batch -> (data, expert)); after dispatch the expert dimension is split over 'expert' and
the routing groups over 'data' only (expert_group -> data), so XLA moves tokens with an all-to-all over 'expert'.
Heads, feed-forward hidden units (dense and expert) and the vocabulary split over 'model'.
"""

from __future__ import annotations

from typing import Sequence

from jax.sharding import PartitionSpec

from switchx import axes

MESH_AXES = ("data", "expert", "model")

STANDARD_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (axes.BATCH, ("data", "expert")),
    (axes.EXPERT, "expert"),
    (axes.EXPERT_GROUP, "data"),
    (axes.HEADS, "model"),
    (axes.MLP, "model"),
    (axes.EXPERT_MLP, "model"),
    (axes.VOCAB, "model"),
    (axes.EMBED, None),
    (axes.KV, None),
    (axes.LENGTH, None),
    (axes.RELPOS, None),
    (axes.UNMODELED, None),
)


class UnknownAxisError(ValueError):
  pass


def mesh_axes_for(name: str | None, rules: Sequence = STANDARD_RULES) -> tuple[str, ...]:
  """The mesh axes a logical name maps to (empty: replicated)."""
  if name is None:
    return ()
  for logical, mesh in rules:
    if logical == name:
      return () if mesh is None else ((mesh,) if isinstance(mesh, str) else tuple(mesh))
  known = ", ".join(logical for logical, _ in rules)
  raise UnknownAxisError(f"logical axis {name!r} has no rule; add it to switchx/parallel/rules.py "
                         f"(known: {known}).")


def logical_to_spec(names: Sequence[str | None], rules: Sequence = STANDARD_RULES) -> PartitionSpec:
  """Logical names of a tensor's dims -> a PartitionSpec. A mesh axis is used at most once per tensor: when two
  dims claim it (e.g. batch and expert), the first one keeps it."""
  used: set[str] = set()
  spec = []
  for name in names:
    mesh = tuple(a for a in mesh_axes_for(name, rules) if a not in used)
    used.update(mesh)
    spec.append(None if not mesh else (mesh[0] if len(mesh) == 1 else mesh))
  return PartitionSpec(*spec)

"""The partitioner: logical names -> shardings for parameters, optimizer state and batches, checked before
anything is compiled, plus jit with those shardings.

    partitioner = Partitioner(make_mesh(MeshConfig(data=2, expert=4)))
    state_specs = partitioner.state_specs(abstract_state, abstract_boxed_params)   # validated
    with partitioner.context():
      state = jax.jit(init, out_shardings=partitioner.shardings(state_specs))(rng, batch)

Optimizer states get their specs from the parameter they belong to (matched by tree path): a leaf of the
parameter's shape takes its names; a factored Adafactor statistic (one dim fewer) takes the names of the dims it
kept; anything else (step counts, placeholders) is replicated. No regex patches.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from switchx import axes
from switchx.parallel.rules import STANDARD_RULES, UnknownAxisError, logical_to_spec



def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def path_str(path) -> str:
  return "/".join(_keys(path))


def param_names(boxed_params) -> dict[tuple[str, ...], tuple[tuple[str | None, ...], tuple[int, ...]]]:
  """{parameter path: (logical names, shape)} from an (abstract) boxed parameter tree."""
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=is_box)[0]:
    if not is_box(leaf):
      raise ValueError(f"parameter {path_str(path)} has no logical axis names; create it with "
                       "nn.with_logical_partitioning(init, names).")
    out[_keys(path)] = (tuple(leaf.names), tuple(leaf.value.shape))
  return out


def derived_names(path, shape: tuple[int, ...], params: dict) -> tuple[str | None, ...]:
  """Logical names of an optimizer-state leaf, from the parameter whose path ends its own path."""
  keys = _keys(path)
  for start in range(len(keys)):
    if keys[start:] in params:
      names, param_shape = params[keys[start:]]
      break
  else:
    return (None,) * len(shape)                                  # not per-parameter: replicate
  if tuple(shape) == param_shape:
    return names
  if len(shape) == len(param_shape) - 1:                         # a factored second-moment statistic
    for dropped in range(len(param_shape)):
      if param_shape[:dropped] + param_shape[dropped + 1:] == tuple(shape):
        # With two equal-sized dims either choice has the same shape; sharding stays valid either way.
        return names[:dropped] + names[dropped + 1:]
  return (None,) * len(shape)


class Partitioner:
  def __init__(self, mesh: Mesh, rules: Sequence = STANDARD_RULES):
    self.mesh, self.rules = mesh, tuple(rules)

  # --- specs -------------------------------------------------------------------------------------------
  def spec(self, names: Sequence[str | None], what: str = "tensor") -> PartitionSpec:
    try:
      return logical_to_spec(names, self.rules)
    except UnknownAxisError as e:
      raise ValueError(f"{what}: {e}") from None

  def check_divisible(self, what: str, shape: Sequence[int], spec: PartitionSpec,
                      fix: str = "change the model size or the mesh") -> None:
    for dim, (size, mesh_axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
      if mesh_axes is None:
        continue
      mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
      ways = math.prod(self.mesh.shape[a] for a in mesh_axes)
      if size % ways:
        raise ValueError(f"{what}: dimension {dim} has size {size}, which the mesh axes {mesh_axes} "
                         f"({ways} devices) do not divide; {fix} (mesh {dict(self.mesh.shape)}).")

  def param_specs(self, boxed_params) -> Any:
    """PartitionSpecs for the (unboxed) parameter tree, validated for divisibility."""
    def one(path, leaf):
      what = f"parameter {path_str(path)} {tuple(leaf.value.shape)} {tuple(leaf.names)}"
      spec = self.spec(leaf.names, what)
      self.check_divisible(what, leaf.value.shape, spec)
      return spec
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    param_names(boxed_params)  # every leaf must carry names
    return jax.tree_util.tree_map_with_path(one, boxed_params, is_leaf=is_box)

  def tree_specs(self, abstract_tree, boxed_params, what: str) -> Any:
    """Specs for any tree whose leaves belong to parameters (optimizer state), validated for divisibility."""
    params = param_names(boxed_params)

    def one(path, leaf):
      names = derived_names(path, tuple(leaf.shape), params)
      label = f"{what} {path_str(path)} {tuple(leaf.shape)} {names}"
      spec = self.spec(names, label)
      self.check_divisible(label, leaf.shape, spec)
      return spec
    return jax.tree_util.tree_map_with_path(one, abstract_tree)

  def state_specs(self, abstract_state, boxed_params) -> Any:
    """Specs for a TrainState(step, params, opt_state) built from `boxed_params`' names."""
    return abstract_state.replace(step=PartitionSpec(), params=nn.unbox(self.param_specs(boxed_params)),
                                  opt_state=self.tree_specs(abstract_state.opt_state, boxed_params,
                                                            "optimizer state"))

  def check_batch(self, batch_size: int) -> None:
    self.check_divisible("the batch (TrainConfig.batch_size)", (batch_size,), self.spec((axes.BATCH,)),
                         fix="make the batch size a multiple of the mesh's data x expert devices")

  # --- shardings and compilation -----------------------------------------------------------------------
  def shardings(self, specs) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(self.mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))

  @property
  def batch_sharding(self) -> NamedSharding:
    """Every batch array is [B, L] with B split like the logical 'batch' axis."""
    return NamedSharding(self.mesh, self.spec((axes.BATCH, axes.LENGTH)))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @contextlib.contextmanager
  def context(self):
    """The mesh and the logical axis rules, for tracing and running model code."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  @property
  def num_batch_partitions(self) -> int:
    """Devices the batch (and so the MoE routing groups) is split over."""
    spec = self.spec((axes.BATCH,))[0]
    spec = () if spec is None else ((spec,) if isinstance(spec, str) else spec)
    return math.prod(self.mesh.shape[a] for a in spec)


def abstract_mesh(shape: dict[str, int]) -> jax.sharding.AbstractMesh:
  """A mesh description without devices (for planning a slice you do not have)."""
  return jax.sharding.AbstractMesh(tuple(shape.values()), tuple(shape.keys()))


"""Logical axis rules and the partitioner's specs, on mesh descriptions (no devices needed)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from switchx.config import TrainConfig
from switchx.parallel.mesh import MeshConfig
from switchx.parallel.partitioning import Partitioner, abstract_mesh
from switchx.parallel.rules import logical_to_spec
from switchx.train import optim


def test_rules_table():
  assert logical_to_spec(("batch", "length", "embed")) == P(("data", "expert"), None, None)
  assert logical_to_spec(("expert", "embed", "expert_mlp")) == P("expert", None, "model")
  # Dispatched tokens: experts over 'expert', groups over 'data' (the all-to-all happens between the two).
  assert logical_to_spec(("expert", "expert_group", "unmodeled", "embed")) == P("expert", "data", None, None)
  # A mesh axis is used once per tensor: batch keeps 'expert', a later expert dim does not get it again.
  assert logical_to_spec(("batch", "expert")) == P(("data", "expert"), None)
  with pytest.raises(ValueError, match="no rule"):
    logical_to_spec(("embed", "headz"))


def _boxed(shape, names):
  return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)


def test_adafactor_factored_statistics_take_the_names_of_the_dims_they_keep():
  # Large enough to be factored (min dim 128), experts vmapped: v_row [E, D], v_col [E, F].
  boxed = {"layers_1": {"moe": {"experts": {"wi": _boxed((16, 256, 512), ("expert", "embed", "expert_mlp"))},
                                "router": _boxed((256, 16), ("embed", "unmodeled"))}},
           "mlp": {"wi": {"kernel": _boxed((256, 1024), ("embed", "mlp"))}}}
  params = nn.unbox(boxed)
  tx, _ = optim.make_optimizer(TrainConfig(optimizer="adafactor"))
  opt_state = jax.eval_shape(tx.init, params)
  partitioner = Partitioner(abstract_mesh({"data": 2, "expert": 4, "model": 2}))
  specs = partitioner.tree_specs(opt_state, boxed, "optimizer state")
  pairs = [(leaf.shape, spec) for leaf, spec in zip(jax.tree_util.tree_leaves(opt_state),
                                                    jax.tree_util.tree_leaves(specs,
                                                                              is_leaf=lambda x: isinstance(x, P)))]
  assert ((16, 256), P("expert", None)) in pairs                 # v_row of the experts
  assert ((16, 512), P("expert", "model")) in pairs              # v_col of the experts
  assert ((1024,), P("model")) in pairs                          # v_col of the dense kernel
  assert all(spec == P() for shape, spec in pairs if shape == ())  # step counts replicated


def test_divisibility_errors_name_the_parameter():
  boxed = {"attention": {"query": {"kernel": _boxed((64, 6, 16), ("embed", "heads", "kv"))}}}
  partitioner = Partitioner(abstract_mesh({"data": 1, "expert": 1, "model": 4}))
  with pytest.raises(ValueError, match=r"attention/query/kernel.*size 6.*'model'"):
    partitioner.param_specs(boxed)
  boxed = {"w": _boxed((64,), ("embedding_dim",))}
  with pytest.raises(ValueError, match="w.*'embedding_dim' has no rule"):
    partitioner.param_specs(boxed)


@pytest.mark.parametrize("text,shape", [("data=2,expert=4", (2, 4, 1)), ("", (8, 1, 1)),
                                        ("data=-1,model=2", (4, 1, 2))])
def test_mesh_config_parse(text, shape):
  assert MeshConfig.parse(text).shape(8) == shape


def test_mesh_config_errors():
  with pytest.raises(ValueError, match="product"):
    MeshConfig(2, 2, 3).shape(8)
  with pytest.raises(ValueError, match="AXIS=SIZE"):
    MeshConfig.parse("dat=2")


def test_plan_switch_c_2048_on_2048_devices_without_them():
  from switchx import gin_config, model_stats
  from switchx.train.plan import plan
  model, train = gin_config.load(["switch_c_2048", "runs/pretrain"], ["TrainConfig.batch_size=2048"])
  result = plan(model, train, {"data": 16, "expert": 128, "model": 1})
  counts = model_stats.param_counts(model)
  # Another way: experts split 128 ways, everything else replicated (model axis of size 1), 4 bytes each.
  expected = 4 * (counts["expert_params"] // 128 + counts["total_params"] - counts["expert_params"])
  assert result["devices"] == 2048 and result["params_bytes"] == expected
  assert 0 < result["optimizer_bytes"] < result["params_bytes"]  # Adafactor's factored statistics are small
  assert result["activation_bytes"] > 0


def test_plan_rejects_a_mesh_the_experts_do_not_fit():
  from switchx import gin_config
  from switchx.train.plan import plan
  model, train = gin_config.load(["switch_base_8"], ["TrainConfig.batch_size=64"])
  with pytest.raises(ValueError, match="experts"):
    plan(model, train, {"data": 4, "expert": 16, "model": 1})


def test_plan_counts_adamw_moments_in_their_dtype():
  """AdamW keeps two moments per parameter: 2x the float32 parameters' bytes, or 1x stored in bfloat16."""
  from switchx import gin_config
  from switchx.train.plan import plan
  for dtype, ratio in (("float32", 2.0), ("bfloat16", 1.0)):
    model, train = gin_config.load(["switch_base_8"], ["TrainConfig.batch_size=64", "TrainConfig.optimizer='adamw'",
                                                       f"TrainConfig.adam_moments_dtype='{dtype}'"])
    result = plan(model, train, {"data": 4, "expert": 8, "model": 1})
    assert result["optimizer_bytes"] == pytest.approx(ratio * result["params_bytes"], rel=1e-6), dtype

"""Sharded == single device, on 8 fake CPU devices (run through tests/test_parallel.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from switchx.config import ModelConfig, MoeConfig, TrainConfig
from switchx.parallel.mesh import MeshConfig, make_mesh
from switchx.parallel.partitioning import Partitioner
from switchx.train import state as state_lib

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 4, 1)]  # (data, expert, model)


def switch_config(**changes) -> ModelConfig:
  # Group size 8 gives 16 encoder and 8 decoder groups for this batch: the same groups on every mesh (the
  # partitioner makes the group count a multiple of data x expert), so routing is identical everywhere.
  moe = MoeConfig(num_experts=8, group_size=8, train_capacity_factor=1.0, eval_capacity_factor=1.0,
                  min_capacity=1, load_balance_loss_coef=0.01, router_z_loss_coef=1e-3)
  base = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=2,
              num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
              encoder_sparse="every:2", decoder_sparse="every:2", moe=moe)
  base.update(changes)
  return ModelConfig(**base)


TRAIN = TrainConfig(optimizer="adafactor", learning_rate=0.01, schedule="constant", warmup_steps=0, batch_size=8,
                    inputs_length=16, targets_length=8)


def make_batch(seed=0, batch=8):
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, 64, (batch, 16)).astype(np.int32)
  enc[:, 13:] = 0                                              # some padding
  tgt = rng.randint(2, 64, (batch, 8)).astype(np.int32)
  dec = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt,
          "decoder_loss_weights": np.ones_like(tgt, np.float32)}


def build(mesh_shape, config=None, train=TRAIN):
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  partitioner = Partitioner(make_mesh(MeshConfig(*mesh_shape), devices))
  return state_lib.build(config or switch_config(), train, partitioner, make_batch())


@pytest.fixture(scope="module")
def reference():
  run = build((1, 1, 1))
  state = run.init(jax.random.PRNGKey(0))
  batch = run.shard_batch(make_batch())
  (loss, metrics), grads = run.grads(state.params, batch, jax.random.PRNGKey(1))
  new_state, _ = run.train_step(jax.tree_util.tree_map(jnp.copy, state), batch, jax.random.PRNGKey(1))
  host = lambda t: jax.tree_util.tree_map(np.asarray, t)
  return dict(params=host(state.params), loss=float(loss), metrics=host(metrics), grads=host(grads),
              new_params=host(new_state.params))


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "data%d-expert%d-model%d" % m)
def test_loss_and_gradients_equal_single_device(mesh_shape, reference):
  run = build(mesh_shape)
  params = jax.device_put(reference["params"], run.state_shardings.params)
  batch = run.shard_batch(make_batch())
  (loss, metrics), grads = run.grads(params, batch, jax.random.PRNGKey(1))
  np.testing.assert_allclose(float(loss), reference["loss"], rtol=1e-6)
  assert float(metrics["router/dropped_fraction"]) == pytest.approx(
      float(reference["metrics"]["router/dropped_fraction"]))
  flat_ref = jax.tree_util.tree_flatten_with_path(reference["grads"])[0]
  for (path, ref), got in zip(flat_ref, jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=2e-7, err_msg=jax.tree_util.keystr(path))



@pytest.mark.parametrize("path", ["dropless", "ragged"])
def test_dropless_data_parallel_equals_single_device(monkeypatch, path):
  """Dropless dispatch lays out its blocks (ragged: its sorted runs of rows) within each batch shard; with data
  and model parallelism (4 x 2) the loss and gradients equal one device's, where all tokens share one layout."""
  from switchx.moe import dispatch
  monkeypatch.setattr(dispatch, "WEIGHT_PASS", 0)   # blocks at any load, so every shard runs the block layout
  config = switch_config(moe=MoeConfig(num_experts=8, group_size=8, dispatch=path,
                                       load_balance_loss_coef=0.01, router_z_loss_coef=1e-3))
  results = []
  for shape in ((1, 1, 1), (4, 1, 2)):
    run = build(shape, config)
    params = run.init(jax.random.PRNGKey(0)).params
    (loss, metrics), grads = run.grads(params, run.shard_batch(make_batch()), jax.random.PRNGKey(1))
    results.append((float(loss), float(metrics["router/dropped_fraction"]), jax.tree_util.tree_leaves(grads)))
  (loss_ref, dropped_ref, grads_ref), (loss, dropped, grads) = results
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  assert dropped == dropped_ref == 0.0
  for got, ref in zip(grads, grads_ref):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-7)


def test_sharded_init_and_train_step_equal_single_device(reference):
  run = build((2, 2, 2))
  state = run.init(jax.random.PRNGKey(0))  # created sharded: each device computes only its shards
  for got, ref in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(reference["params"])):
    np.testing.assert_array_equal(np.asarray(got), ref)         # the same numbers wherever the shards live
  new_state, _ = run.train_step(state, run.shard_batch(make_batch()), jax.random.PRNGKey(1))
  for got, ref in zip(jax.tree_util.tree_leaves(new_state.params),
                      jax.tree_util.tree_leaves(reference["new_params"])):
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=2e-7)


def test_parameters_land_where_the_rules_say():
  run = build((2, 4, 1))
  state = run.init(jax.random.PRNGKey(0))
  experts = state.params["encoder"]["layers_1"]["moe"]["experts"]["wi_0"]
  assert experts.sharding.spec == PartitionSpec("expert", None, "model")  # model has size 1 here
  assert experts.addressable_shards[0].data.shape == (2, 32, 64)  # 8 experts over 4 expert shards
  # The experts' optimizer statistics follow them (dims under 128 are not factored: full [E, D, F] moments).
  expert_stats = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.shape == (8, 32, 64)]
  assert expert_stats and all(x.sharding.spec[0] == "expert" for x in expert_stats)
  run = build((1, 2, 4))
  state = run.init(jax.random.PRNGKey(0))
  query = state.params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
  assert query.sharding.spec == PartitionSpec(None, "model", None)  # heads over 'model'
  wi = state.params["encoder"]["layers_1"]["moe"]["experts"]["wi_0"]
  assert wi.sharding.spec == PartitionSpec("expert", None, "model")
  assert wi.addressable_shards[0].data.shape == (4, 32, 16)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 4, 1)])
def test_expert_parallel_step_moves_tokens_with_all_to_all(mesh_shape):
  run = build(mesh_shape)
  state = jax.eval_shape(run._init, jax.random.PRNGKey(0))
  batch = run.shard_batch(make_batch())
  with run.partitioner.context():
    hlo = run._train_step.lower(state, batch, jax.random.PRNGKey(1)).compile().as_text()
  assert "all-to-all" in hlo
  dense = build((8, 1, 1), switch_config(encoder_sparse="none", decoder_sparse="none"))
  state = jax.eval_shape(dense._init, jax.random.PRNGKey(0))
  with dense.partitioner.context():
    hlo = dense._train_step.lower(state, dense.shard_batch(make_batch()), jax.random.PRNGKey(1)).compile()
  assert "all-to-all" not in hlo.as_text()  # data parallelism alone needs none


@pytest.mark.parametrize("make,expected", [
    (lambda: build((1, 8, 1), switch_config(moe=MoeConfig(num_experts=6, group_size=8))), "experts"),
    (lambda: build((1, 8, 1), switch_config(moe=MoeConfig(num_experts=8, group_size=8, dispatch="dropless"))),
     "dropless"),
    (lambda: build((1, 1, 8), switch_config(num_heads=4)), "heads"),
    (lambda: build((2, 2, 2), train=TrainConfig(batch_size=6)), "batch_size"),
    (lambda: make_mesh(MeshConfig(2, 2, 3)), "product"),
    (lambda: make_mesh(MeshConfig(-1, 3, 1)), "divisible"),
])
def test_bad_mesh_configs_fail_before_compiling(make, expected):
  with pytest.raises(ValueError, match=expected):
    make()


def test_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path, reference):
  from switchx.train.checkpoint import Checkpointer
  saving = build((8, 1, 1))
  state = saving.init(jax.random.PRNGKey(0))                    # its loss is reference["loss"]
  checkpoints = Checkpointer(tmp_path)
  checkpoints.save(1, state, {"note": "saved on data=8"})
  checkpoints.wait()
  restoring = build((1, 2, 4))
  restored, meta, step = Checkpointer(tmp_path).restore(restoring.abstract_state())
  assert step == 1 and meta["note"] == "saved on data=8"
  wi = restored.params["encoder"]["layers_1"]["moe"]["experts"]["wi_0"]
  assert wi.sharding.spec == PartitionSpec("expert", None, "model") and wi.sharding.mesh.shape["model"] == 4
  (loss, _), _ = restoring.grads(restored.params, restoring.shard_batch(make_batch()), jax.random.PRNGKey(1))
  np.testing.assert_allclose(float(loss), reference["loss"], rtol=1e-6)


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 2, 4)])
def test_plan_matches_the_shards_training_creates(mesh_shape):
  from switchx.train.plan import plan
  run = build(mesh_shape)
  state = run.init(jax.random.PRNGKey(0))
  device = jax.devices()[0]
  on_device = lambda tree: sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(tree)
                               for s in leaf.addressable_shards if s.device == device)
  predicted = plan(switch_config(), TRAIN, dict(zip(("data", "expert", "model"), mesh_shape)))
  assert predicted["params_bytes"] == on_device(state.params)
  assert predicted["optimizer_bytes"] == on_device(state.opt_state)


def test_global_balance_loss_is_the_same_on_any_data_split_and_the_per_group_loss_is_not():
  """One routing group on one device, four on a data=4 mesh (the group count follows the batch split), no
  token dropped: outputs are the same either way, and so is the global-batch balance loss (its statistics sum
  over every device's tokens); the Switch per-group loss averages other groups' products and differs."""
  losses = {}
  for scope in ("global", "group"):
    moe = MoeConfig(num_experts=8, group_size=4096, train_capacity_factor=0.0, eval_capacity_factor=0.0,
                    load_balance_loss_coef=0.01, balance_loss_scope=scope)
    for shape in ((1, 1, 1), (4, 1, 1)):
      run = build(shape, switch_config(moe=moe))
      params = run.init(jax.random.PRNGKey(0)).params
      (loss, metrics), grads = run.grads(params, run.shard_batch(make_batch()), jax.random.PRNGKey(1))
      losses[scope, shape] = (float(loss), float(metrics["load_balance_loss"]),
                              [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)])
  one, four = losses["global", (1, 1, 1)], losses["global", (4, 1, 1)]
  np.testing.assert_allclose(four[:2], one[:2], rtol=1e-6)
  for a, b in zip(four[2], one[2]):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-7)
  assert abs(losses["group", (4, 1, 1)][1] - losses["group", (1, 1, 1)][1]) > 1e-3
  assert losses["group", (1, 1, 1)][1] == pytest.approx(one[1], rel=1e-6)   # one group: the two scopes agree


def test_bias_balancing_counts_the_load_over_every_device():
  """Bias balancing's update reads each layer's load over the whole batch: after one train step on a data=4
  and on an expert=2 x data=2 mesh, every router_bias equals the single-device step's bit for bit (the loads
  are integers, so their sum does not depend on the order), and the step moved it."""
  from flax import traverse_util
  config = switch_config(moe=MoeConfig(num_experts=8, group_size=8, train_capacity_factor=1.0, min_capacity=1,
                                       load_balance_loss_coef=0.0, bias_balance_rate=0.01))
  biases = {}
  for shape in ((1, 1, 1), (4, 1, 1), (2, 2, 1)):
    run = build(shape, config)
    state = run.init(jax.random.PRNGKey(0))
    new_state, _ = run.train_step(state, run.shard_batch(make_batch()), jax.random.PRNGKey(1))
    biases[shape] = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(new_state.params).items()
                     if k[-1] == "router_bias"}
  one = biases[(1, 1, 1)]
  assert len(one) == 2 and all(np.abs(b).max() == np.float32(0.01) for b in one.values())
  for shape in ((4, 1, 1), (2, 2, 1)):
    for path, bias in one.items():
      np.testing.assert_array_equal(biases[shape][path], bias)


def test_decoder_only_moe_sharded_equals_one_device_in_loss_and_gradients():
  """The decoder-only model (grouped-query attention, top-2 experts with a capacity, so some tokens are dropped)
  through the same partitioner: loss and every gradient on data / expert / model meshes equal one device's.
  Group size 8: the same routing groups on every mesh."""
  from switchx.config import DecoderOnlyConfig
  config = DecoderOnlyConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                             sparse="all", moe=MoeConfig(num_experts=8, top_k=2, normalize_gates=True, group_size=8,
                                                         train_capacity_factor=1.0, min_capacity=1,
                                                         load_balance_loss_coef=0.01, router_z_loss_coef=1e-3))
  rng = np.random.RandomState(0)
  stream = rng.randint(2, 64, (8, 17)).astype(np.int32)
  batch = {"decoder_input_tokens": stream[:, :-1], "decoder_target_tokens": stream[:, 1:],
           "decoder_loss_weights": np.ones((8, 16), np.float32)}
  results = {}
  for shape in ((1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)):   # model=2: it splits the 2 key/value heads
    devices = jax.devices()[: int(np.prod(shape))]
    run = state_lib.build(config, TRAIN, Partitioner(make_mesh(MeshConfig(*shape), devices)), batch)
    params = run.init(jax.random.PRNGKey(0)).params
    (loss, metrics), grads = run.grads(params, run.shard_batch(batch), jax.random.PRNGKey(1))
    results[shape] = (float(loss), float(metrics["router/dropped_fraction"]),
                      [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)])
  one = results[(1, 1, 1)]
  assert one[1] > 0                                                   # some tokens dropped: capacity is real
  for shape, (loss, dropped, grads) in results.items():
    assert loss == pytest.approx(one[0], rel=1e-6) and dropped == pytest.approx(one[1]), shape
    for a, b in zip(grads, one[2]):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-7)


def test_task_routing_sharded_equals_single_device():
  """Task-level routing (each token's task id picks its router logits): on data x expert x model = 2 x 2 x 2 the
  loss and gradients, the task table's included, equal one device's."""
  config = switch_config(moe=MoeConfig(num_experts=8, group_size=8, route_by="task", num_tasks=3,
                                       train_capacity_factor=0.0, eval_capacity_factor=0.0,
                                       load_balance_loss_coef=0.01, router_z_loss_coef=1e-3))
  batch = make_batch()
  tasks = (np.arange(8) % 3).astype(np.int32)[:, None]                       # three tasks across the rows
  batch["encoder_task_ids"], batch["decoder_task_ids"] = np.repeat(tasks, 16, 1), np.repeat(tasks, 8, 1)
  results = []
  for shape in ((1, 1, 1), (2, 2, 2)):
    run = build(shape, config)
    params = run.init(jax.random.PRNGKey(0)).params
    (loss, _), grads = run.grads(params, run.shard_batch(batch), jax.random.PRNGKey(1))
    results.append((float(loss), jax.tree_util.tree_flatten_with_path(grads)[0]))
  (loss_ref, grads_ref), (loss, grads) = results
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  assert any("task_router" in jax.tree_util.keystr(path) for path, _ in grads)
  for (path, got), (_, ref) in zip(grads, grads_ref):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_nllb_variant_sharded_equals_single_device():
  """The NLLB-MoE variant (sinusoidal positions, LayerNorm, biases everywhere, expert biases, kept-gate
  renormalisation, top-2): on data x expert x model = 2 x 2 x 2 the loss and every gradient, the biases
  included, equal one device's."""
  config = switch_config(position_embedding="sinusoidal", norm="layer", layer_norm_epsilon=1e-5, use_bias=True,
                         scale_embeddings=True, logits_via_embedding=True, rescale_tied_logits=False,
                         activation="relu",
                         moe=MoeConfig(num_experts=8, group_size=8, top_k=2, normalize_gates=True,
                                       normalize_kept_gates=True, train_capacity_factor=1.0, min_capacity=1,
                                       load_balance_loss_coef=0.01, router_z_loss_coef=1e-3))
  results = []
  for shape in ((1, 1, 1), (2, 2, 2)):
    run = build(shape, config)
    params = run.init(jax.random.PRNGKey(0)).params
    (loss, metrics), grads = run.grads(params, run.shard_batch(make_batch()), jax.random.PRNGKey(1))
    results.append((float(loss), float(metrics["router/dropped_fraction"]),
                    jax.tree_util.tree_flatten_with_path(grads)[0]))
  (loss_ref, dropped_ref, grads_ref), (loss, dropped, grads) = results
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  assert dropped == pytest.approx(dropped_ref)
  assert any("wo_bias" in jax.tree_util.keystr(path) for path, _ in grads)
  for (path, got), (_, ref) in zip(grads, grads_ref):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-7,
                               err_msg=jax.tree_util.keystr(path))

"""The pure steps: sharded == single device, micro-batching == one batch, NaN refused."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from configs import glue as glue_cfg
from research import losses, optim, parallel, steps
from research.models.bert import BertClassifier, BertConfig

CFG = BertConfig(
  vocab_size=100,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=64,
  max_position_embeddings=32,
)


def _batch(b=16, length=12, seed=0, num_labels=2):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, length + 1, size=b)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  weights = np.ones(b, np.float32)
  weights[-3:] = 0  # padded rows
  return {
    "input_ids": rng.integers(1, CFG.vocab_size, size=(b, length)).astype(np.int32) * mask,
    "attention_mask": mask,
    "token_type_ids": np.zeros((b, length), np.int32),
    "labels": rng.integers(0, num_labels, size=b).astype(np.int32),
    "weights": weights,
  }


# Where two runs must agree exactly although they draw dropout masks differently.
CFG_NO_DROPOUT = BertConfig(**(CFG.to_dict() | {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))


def _setup(opt_overrides=None, total_steps=10, cfg=CFG):
  model = BertClassifier(cfg, num_labels=2)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), ids, ids, ids)["params"]
  oc = glue_cfg.get_config().optimizer
  oc.unlock()
  oc.update(opt_overrides or {})
  tx, schedule = optim.make_optimizer(oc, params, total_steps)
  state = steps.create_state(params, tx, jax.random.PRNGKey(1))
  return model, tx, schedule, state


def _run(mesh, batches, grad_accum=1, opt=None, kind="jit", cfg=CFG, **step_kwargs):
  model, tx, schedule, state = _setup(opt, cfg=cfg)
  strategy = parallel.Strategy(kind, mesh)
  fn = strategy.compile_train(
    functools.partial(
      steps.train_step,
      model=model,
      loss_fn=losses.softmax_xent,
      tx=tx,
      schedule=schedule,
      grad_accum=grad_accum,
      **step_kwargs,
    )
  )
  state = strategy.put_state(state)
  history = []
  for b in batches:
    state, m = fn(state, strategy.put_batch(b))
    history.append(strategy.scalars(m))
  return jax.device_get(strategy.get_state(state)), history


def test_sharded_step_equals_single_device():
  assert jax.device_count() == 8
  batches = [_batch(seed=s) for s in range(3)]
  one, h1 = _run(parallel.make_mesh(1), batches)
  eight, h8 = _run(parallel.make_mesh(8), batches)
  # Only the order of the cross-device sum differs: fp32 rounding, nothing more.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one.params, eight.params)
  for a, b in zip(h1, h8):
    np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-6)
    assert a["count"] == b["count"] == 13.0  # 3 padded rows carry no weight
  assert int(eight.step) == 3


@pytest.mark.parametrize("fsdp", [4, 8])
def test_fsdp_step_equals_single_device(fsdp, monkeypatch):
  """Parameters and optimizer state sharded ZeRO-3 style over `fsdp` devices: same trajectory
  as one device (tolerance: fp32 summation order of the reduce-scatter, as for data parallel)."""
  monkeypatch.setattr(parallel, "FSDP_MIN_SIZE", 64)  # shard even this tiny model's matrices
  batches = [_batch(seed=s) for s in range(3)]
  one, h1 = _run(parallel.make_mesh(1), batches)
  mesh = parallel.make_mesh(8, fsdp=fsdp)
  assert dict(mesh.shape) == {"data": 8 // fsdp, "fsdp": fsdp}
  sharded, hs = _run(mesh, batches)
  sparse, _ = _run(mesh, batches, sparse_embed=True)  # the embedding table's rows scattered into shards
  for other in (sharded, sparse):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), one.params, other.params)
  for a, b in zip(h1, hs):
    np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-6)
  # The big arrays really are split: each device holds 1/fsdp of a layer's MLP kernel and its Adam moments.
  _, _, _, state = _setup()
  placed = parallel.Strategy("jit", mesh).put_state(state)
  kernel = placed.params["bert"]["layer_0"]["mlp_in"]["kernel"]
  assert kernel.sharding.spec == parallel.P(None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (32, 64 // fsdp)
  mu = placed.opt_state.mu["bert"]["layer_0"]["mlp_in"]["kernel"]
  assert mu.addressable_shards[0].data.shape == (32, 64 // fsdp)
  with pytest.raises(ValueError, match="config.fsdp > 1 needs config.parallel='jit'"):
    parallel.Strategy("pmap", mesh)
  with pytest.raises(ValueError, match="config.fsdp=3 must divide"):
    parallel.make_mesh(8, fsdp=3)


def test_bf16_matmul_step_shards_like_the_single_device_step(monkeypatch):
  """model.matmul_dtype=bfloat16 under data parallelism and FSDP: the single-device trajectory
  (fp32 summation order apart, which can flip a bf16 rounding), and close to the fp32 step's."""
  import dataclasses

  monkeypatch.setattr(parallel, "FSDP_MIN_SIZE", 64)
  cfg = dataclasses.replace(CFG, matmul_dtype="bfloat16")
  batches = [_batch(seed=s) for s in range(3)]
  one, h1 = _run(parallel.make_mesh(1), batches, cfg=cfg)
  for mesh in (parallel.make_mesh(8), parallel.make_mesh(8, fsdp=4)):
    other, h = _run(mesh, batches, cfg=cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), one.params, other.params)
    for a, b in zip(h1, h, strict=True):
      np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-4)
  fp32, h32 = _run(parallel.make_mesh(1), batches)
  for a, b in zip(h1, h32, strict=True):
    np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-2)
    assert a["loss_sum"] != b["loss_sum"]  # the matmuls did run in bf16


def test_sharded_init_builds_each_devices_shards_only(monkeypatch):
  """Under fsdp, random parameters and the optimizer state are created straight into their shards
  (jit with out_shardings): the same values as a whole-array init, never whole on one device."""
  monkeypatch.setattr(parallel, "FSDP_MIN_SIZE", 64)
  mesh = parallel.make_mesh(8, fsdp=8)
  mc = common.model_config("tiny")  # 2 layers, 64 wide, MLP 128
  mc.vocab_size = 100
  from research.train import build_model

  _, whole, _ = build_model(mc, 2, 100, jax.random.PRNGKey(0))
  _, params, _ = build_model(mc, 2, 100, jax.random.PRNGKey(0), mesh=mesh)
  kernel = params["bert"]["layer_0"]["mlp_in"]["kernel"]
  assert kernel.sharding.spec == parallel.P(None, "fsdp") and kernel.addressable_shards[0].data.shape == (64, 16)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(whole))

  oc = glue_cfg.get_config().optimizer
  tx, _ = optim.make_optimizer(oc, whole, 10)

  def create(p, r):
    return steps.create_state(p, tx, r)

  state = parallel.init_sharded(create, params, jax.random.PRNGKey(1), mesh=mesh)
  mu = state.opt_state.mu["bert"]["layer_0"]["mlp_in"]["kernel"]
  assert mu.sharding.spec == parallel.P(None, "fsdp") and mu.addressable_shards[0].data.shape == (64, 16)
  # What one device's init program outputs: the sharded leaves at 1/8 of their size.
  shapes = jax.eval_shape(create, params, jax.random.PRNGKey(1))
  out = jax.jit(create, out_shardings=parallel.state_shardings(shapes, mesh)).lower(params, jax.random.PRNGKey(1))
  per_device = out.compile().memory_analysis().output_size_in_bytes
  whole_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  assert per_device < 0.5 * whole_bytes, (per_device, whole_bytes)


def test_grad_accumulation_equals_one_big_batch():
  """Micro-batches average exactly like the whole batch (dropout off: the rngs differ)."""
  batches = [_batch(seed=s) for s in range(2)]
  mesh = parallel.make_mesh(8)
  full, hf = _run(mesh, batches, cfg=CFG_NO_DROPOUT)
  acc, ha = _run(mesh, batches, grad_accum=2, cfg=CFG_NO_DROPOUT)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), full.params, acc.params)
  np.testing.assert_allclose(hf[0]["grad_norm"], ha[0]["grad_norm"], rtol=1e-5)


def test_sam_steps_with_the_gradient_at_the_perturbed_weights():
  """Under SGD (lr 1, no clipping) a step's update is minus the gradient it used, so SAM's update
  must be minus the plain step's gradient at w + rho g/|g|; the same sharded over eight devices
  and in micro-batches (dropout off there: the micro-batch rngs differ)."""
  rho, batch = 0.05, _batch(seed=3)
  model, _, schedule, state = _setup()
  sgd = optax.sgd(1.0)
  state = steps.create_state(state.params, sgd, state.rng)
  step = functools.partial(steps.train_step, model=model, loss_fn=losses.softmax_xent, tx=sgd, schedule=schedule)
  g = jax.tree.map(jnp.subtract, state.params, jax.jit(step)(state, batch)[0].params)
  scale = rho / optax.tree.norm(g)
  moved = state.replace(params=jax.tree.map(lambda w, d: w + scale * d, state.params, g))
  g_moved = jax.tree.map(jnp.subtract, moved.params, jax.jit(step)(moved, batch)[0].params)
  sam, m = jax.jit(functools.partial(step, sam_rho=rho))(state, batch)
  expected = jax.tree.map(jnp.subtract, state.params, g_moved)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sam.params, expected)
  np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(g_moved), rtol=1e-5)
  assert float(optax.tree.norm(jax.tree.map(jnp.subtract, g_moved, g))) > 1e-4  # the perturbation mattered

  batches = [_batch(seed=s) for s in range(2)]
  one, h1 = _run(parallel.make_mesh(1), batches, cfg=CFG_NO_DROPOUT, sam_rho=rho)
  for accum in (1, 2):
    eight, h8 = _run(parallel.make_mesh(8), batches, grad_accum=accum, cfg=CFG_NO_DROPOUT, sam_rho=rho)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one.params, eight.params)
    np.testing.assert_allclose(h1[1]["loss_sum"], h8[1]["loss_sum"], rtol=1e-5)
  oc = glue_cfg.get_config().optimizer
  oc.sam_rho = -0.1
  with pytest.raises(ValueError, match="optimizer.sam_rho=-0.1"):
    optim.make_optimizer(oc, state.params, 10)


def test_rdrop_meets_each_example_with_its_own_copy():
  """Without dropout R-Drop's two passes agree, so its step is the plain step: on one device and
  sharded over eight (each row's copy is made on its own device), and with micro-batches."""
  batches = [_batch(seed=s) for s in range(2)]
  plain, hp = _run(parallel.make_mesh(8), batches, cfg=CFG_NO_DROPOUT)
  for devices, accum in ((1, 1), (8, 1), (8, 2)):
    rd, hr = _run(parallel.make_mesh(devices), batches, grad_accum=accum, cfg=CFG_NO_DROPOUT, rdrop_alpha=1.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), plain.params, rd.params)
    for a, b in zip(hp, hr):
      np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-5)
      assert a["count"] == b["count"] and a["correct"] == b["correct"]


def test_rdrop_adds_the_symmetric_kl_of_two_dropout_passes():
  # the regularizer: KL(p||q) + KL(q||p) per example, weighted; squared difference for regression
  a, b = jnp.array([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0]]), jnp.array([[0.2, 0.3, -0.5], [0.0, 2.0, 1.0]])
  p, q = jax.nn.softmax(a), jax.nn.softmax(b)
  kl = lambda x, y: (x * jnp.log(x / y)).sum(-1)  # noqa: E731
  expected = (kl(p, q) + kl(q, p)) * jnp.array([2.0, 1.0])
  np.testing.assert_allclose(losses.rdrop_consistency(a, b, jnp.array([2.0, 1.0])), expected.sum(), rtol=1e-6)
  assert float(losses.rdrop_consistency(a, a, jnp.ones(2))) == pytest.approx(0.0, abs=1e-7)
  reg = losses.rdrop_consistency(a[:, :1], b[:, :1], jnp.ones(2))
  np.testing.assert_allclose(reg, 0.8**2, rtol=1e-6)
  # With dropout the two copies draw different masks: the same step with a larger alpha has the
  # same cross-entropy parts and a larger loss, by (alpha' - alpha) / 4 x a positive consistency.
  losses_by_alpha = [_run(parallel.make_mesh(8), [_batch()], rdrop_alpha=alpha)[1][0]["loss_sum"] for alpha in (1, 5)]
  assert losses_by_alpha[1] > losses_by_alpha[0] + 1e-4


def test_nonfinite_loss_is_flagged():
  """The step reports it; the host stops before saving (tests/test_train.py)."""
  model, tx, schedule, state = _setup()
  mesh = parallel.make_mesh(8)
  fn = parallel.compile_train_step(
    functools.partial(steps.train_step, model=model, loss_fn=losses.softmax_xent, tx=tx, schedule=schedule),
    mesh,
    donate=False,
  )
  state = parallel.replicate(state, mesh)
  good = _batch()
  bad = dict(good, weights=good["weights"].copy())
  bad["weights"][0] = np.nan
  _, m = fn(state, parallel.to_global(bad, mesh))
  assert float(m["nonfinite"]) == 1.0
  _, m = fn(state, parallel.to_global(good, mesh))
  assert float(m["nonfinite"]) == 0.0


def test_metrics_are_sums_and_norms():
  _, h = _run(parallel.make_mesh(8), [_batch()])
  m = h[0]
  assert set(m) >= {"loss_sum", "count", "correct", "grad_norm", "param_norm", "update_norm", "lr", "nonfinite"}
  assert 0 <= m["correct"] <= m["count"] and m["loss_sum"] > m["count"] * 0.3
  assert float(m["lr"]) == 0.0  # step 0 of the warmup
  assert np.isfinite(m["param_norm"]) and m["update_norm"] == 0.0  # lr 0: no update yet
  # norms=False (the trainer's step): the same update, norms NaN; the trainer measures them on
  # its logging steps from a copy of the parameters taken before the step (update_norms).
  model, tx, schedule, state = _setup()
  out = {}
  for norms in (True, False):
    fn = jax.jit(
      functools.partial(
        steps.train_step, model=model, loss_fn=losses.softmax_xent, tx=tx, schedule=schedule, norms=norms
      )
    )
    before = fn(state, _batch())[0]
    out[norms] = fn(before, _batch(seed=1))
  assert np.isfinite(out[True][1]["param_norm"]) and np.isnan(out[False][1]["update_norm"])
  assert out[True][1]["update_norm"] > 0
  jax.tree.map(np.testing.assert_array_equal, out[True][0].params, out[False][0].params)
  measured = jax.jit(steps.update_norms)(before.params, out[False][0].params)
  for k in ("param_norm", "update_norm"):
    np.testing.assert_allclose(measured[k], out[True][1][k], rtol=1e-3)


def test_eval_step_drops_nothing_real():
  model, _, _, state = _setup()
  mesh = parallel.make_mesh(8)
  fn = parallel.compile_eval_step(functools.partial(steps.eval_step, model=model, loss_fn=losses.softmax_xent), mesh)
  b = _batch()
  out = fn(parallel.replicate(state.params, mesh), parallel.to_global(b, mesh))
  assert float(out["count"]) == 13.0 and out["logits"].shape == (16, 2)


def test_correct_counts_argmax_hits_by_weight():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((6, 5, 300)).astype(np.float32)  # no ties
  labels = np.where(rng.random((6, 5)) < 0.5, logits.argmax(-1), rng.integers(0, 300, (6, 5))).astype(np.int32)
  weights = (rng.random((6, 5)) < 0.7).astype(np.float32)
  expected = ((logits.argmax(-1) == labels) * weights).sum()
  assert expected > 3 and float(steps._correct(jnp.asarray(logits), labels, weights)) == expected
  # a padded row's label may be anything, out of range included: weight 0 counts nothing
  labels[0, 0], weights[0, 0] = 10_000, 0.0
  assert float(steps._correct(jnp.asarray(logits), labels, weights)) == ((logits.argmax(-1) == labels) * weights).sum()


# --- optimizer -----------------------------------------------------------------------------


def test_weight_decay_mask_skips_biases_and_norms():
  _, _, _, state = _setup()
  mask = optim.decay_mask(state.params)
  assert mask["bert"]["layer_0"]["attn"]["query"]["kernel"]
  assert mask["bert"]["token_embed"]["embedding"]
  assert not mask["bert"]["layer_0"]["attn"]["query"]["bias"]
  assert not mask["bert"]["layer_0"]["mlp_norm"]["scale"]
  assert not mask["bert"]["embed_norm"]["bias"]


@pytest.mark.parametrize("clip_norm, layer_decay", [(1.0, 1.0), (0.0, 0.8), (1e-3, 0.8)])
def test_fused_adamw_equals_the_optax_chain(clip_norm, layer_decay):
  """optim.adamw (the default, one expression per parameter) against the optax chain it fuses:
  clip_by_global_norm -> adamw with the decay mask -> per-parameter lr scales."""
  _, _, _, state = _setup()
  params = state.params
  oc = ml_collections.ConfigDict(
    dict(glue_cfg.get_config().optimizer) | {"clip_norm": clip_norm, "layer_decay": layer_decay, "lr": 1e-2}
  )
  tx, schedule = optim.make_optimizer(oc, params, 10)
  reference = optax.chain(
    optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
    optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay, mask=optim.decay_mask(params)),
    optim.scale_by_tree(optim.layer_lr_scales(params, layer_decay, 2)),
  )

  def train(t):
    p, s = params, t.init(params)
    for i in range(4):  # a new gradient each step; step 0 has lr 0 (warmup)
      key = jax.random.PRNGKey(i)
      grads = jax.tree.map(lambda x, k=key: jax.random.normal(k, x.shape) * 0.1, p)
      u, s = t.update(grads, s, p)
      p = optax.apply_updates(p, u)
    return p

  ours, ref = train(tx), train(reference)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ref, params)
  assert max(jax.tree.leaves(moved)) > 1e-3  # the reference did train
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, ref)


def test_linear_warmup_then_decay():
  oc = ml_collections.ConfigDict(dict(glue_cfg.get_config().optimizer) | {"warmup_ratio": 0.1, "lr": 1.0})
  s = optim.make_schedule(oc, total_steps=100)
  assert [float(s(i)) for i in (0, 5, 10, 55, 100)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])


@pytest.mark.parametrize(
  "schedule, expected",
  [
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    # cosine from 1 to end_lr_ratio=0.1 over the 90 steps after warmup: halfway is 0.55
    ("cosine", [0.0, 0.5, 1.0, 0.55, 0.1]),
    # lr * sqrt(w / (t + w)), t counted from the end of warmup (w = 10)
    ("inverse_sqrt", [0.0, 0.5, 1.0, (10 / 55) ** 0.5, (10 / 100) ** 0.5]),
  ],
)
def test_other_schedules(schedule, expected):
  oc = ml_collections.ConfigDict(
    dict(glue_cfg.get_config().optimizer) | {"warmup_ratio": 0.1, "lr": 1.0, "schedule": schedule, "end_lr_ratio": 0.1}
  )
  s = optim.make_schedule(oc, total_steps=100)
  assert [float(s(i)) for i in (0, 5, 10, 55, 100)] == pytest.approx(expected, rel=1e-5)
  oc.schedule = "cosin"
  with pytest.raises(ValueError, match="cosin"):
    optim.make_schedule(oc, total_steps=100)


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_every_optimizer_lowers_a_simple_loss(name):
  oc = ml_collections.ConfigDict(
    dict(glue_cfg.get_config().optimizer)
    | {"name": name, "lr": 0.05, "warmup_ratio": 0.0, "schedule": "constant", "weight_decay": 0.0}
  )
  params = {"w": {"kernel": jnp.array([[2.0, -1.0], [0.5, 3.0]])}, "b": {"bias": jnp.array([1.0, -2.0])}}
  loss = lambda p: jnp.sum(p["w"]["kernel"] ** 2) + jnp.sum(p["b"]["bias"] ** 2)  # noqa: E731
  tx, _ = optim.make_optimizer(oc, params, 50)
  opt_state = tx.init(params)
  start = loss(params)
  for _ in range(20):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < start


def test_ema_of_the_weights_matches_its_formula_and_leaves_training_unchanged():
  oc = ml_collections.ConfigDict(
    dict(glue_cfg.get_config().optimizer)
    | {"name": "sgd", "lr": 0.1, "warmup_ratio": 0.0, "schedule": "constant", "weight_decay": 0.0, "clip_norm": 0.0}
  )
  params = {"w": {"kernel": jnp.array([1.0, -2.0])}}
  loss = lambda p: jnp.sum(p["w"]["kernel"] ** 2)  # noqa: E731
  plain, _ = optim.make_optimizer(oc, params, 10)
  oc.ema = 0.5
  tx, _ = optim.make_optimizer(oc, params, 10)
  p_plain, s_plain = params, plain.init(params)
  p_ema, s_ema = params, tx.init(params)
  expect = np.asarray(params["w"]["kernel"])
  for t in range(5):
    u, s_plain = plain.update(jax.grad(loss)(p_plain), s_plain, p_plain)
    p_plain = optax.apply_updates(p_plain, u)
    u, s_ema = tx.update(jax.grad(loss)(p_ema), s_ema, p_ema)
    p_ema = optax.apply_updates(p_ema, u)
    d = min(0.5, (1 + t) / (10 + t))  # the decay ramps up over the first updates
    expect = d * expect + (1 - d) * np.asarray(p_ema["w"]["kernel"])
  np.testing.assert_array_equal(p_ema["w"]["kernel"], p_plain["w"]["kernel"])  # training is untouched
  np.testing.assert_allclose(s_ema.ema["w"]["kernel"], expect, rtol=1e-6)
  assert int(s_ema.count) == 5
  # The evaluated weights: the average for trained leaves, the others as they are, also from a
  # checkpoint restored without a target (the state is then a dict).
  full = {"w": {"kernel": p_ema["w"]["kernel"]}, "frozen": {"bias": jnp.ones(2)}}
  for opt_state in (s_ema, {"inner": [], "count": s_ema.count, "ema": s_ema.ema}):
    got = optim.ema_params(full, opt_state)
    np.testing.assert_array_equal(got["w"]["kernel"], s_ema.ema["w"]["kernel"])
    np.testing.assert_array_equal(got["frozen"]["bias"], jnp.ones(2))
  assert optim.ema_params(full, s_plain) is full
  oc.ema = 1.0
  with pytest.raises(ValueError, match="optimizer.ema=1.0"):
    optim.make_optimizer(oc, params, 10)


def test_unknown_optimizer_and_loss_are_named():
  oc = ml_collections.ConfigDict(dict(glue_cfg.get_config().optimizer) | {"name": "adamww"})
  with pytest.raises(KeyError, match="adamww"):
    optim.make_optimizer(oc, {"w": jnp.zeros(2)}, 10)
  with pytest.raises(KeyError, match="config.loss='xent'"):
    losses.get_loss("xent")


def test_pmap_equals_jit():
  """Same step, same batches: pmap (explicit psum) and jit (sharded batch) agree.

  Dropout is off because the two draw masks differently (pmap folds in the device index).
  A step asking for the row-sparse embedding gradient gets the dense one under pmap (each device
  sees its own rows), so it too equals the jit step.
  """
  batches = [_batch(seed=s) for s in range(3)]
  mesh = parallel.make_mesh(8)
  jitted, hj = _run(mesh, batches, cfg=CFG_NO_DROPOUT)
  pmapped, hp = _run(mesh, batches, kind="pmap", cfg=CFG_NO_DROPOUT, sparse_embed=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), jitted.params, pmapped.params)
  for a, b in zip(hj, hp):
    np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-6)
    assert a["count"] == b["count"]
  assert int(pmapped.step) == 3


def test_pmap_with_dropout_trains():
  _, h = _run(parallel.make_mesh(8), [_batch(seed=s) for s in range(2)], kind="pmap")
  assert all(np.isfinite(m["loss_sum"]) and m["nonfinite"] == 0 for m in h)


def test_remat_gives_the_same_gradients():
  """model.remat recomputes activations in the backward pass: same loss and gradients (dropout
  on, so its masks must be redrawn identically), for the BERT encoder and the GPT decoder."""
  from research.models.gpt import GPT, GPTConfig

  batch = _batch()
  ids, mask, types = (jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
  rngs = {"dropout": jax.random.PRNGKey(3)}
  gpt_cfg = GPTConfig(vocab_size=100, block_size=16, num_layers=2, num_heads=2, hidden_size=16, dropout=0.1)
  for make in (
    lambda remat: BertClassifier(BertConfig(**(CFG.to_dict() | {"remat": remat})), num_labels=2),
    lambda remat: GPT(GPTConfig(**(gpt_cfg.to_dict() | {"remat": remat}))),
  ):
    plain, remat = make(False), make(True)
    args = (ids,) if isinstance(plain, GPT) else (ids, mask, types)
    params = plain.init(jax.random.PRNGKey(0), *args)["params"]

    def loss(p, model, args=args):
      return jnp.mean(model.apply({"params": p}, *args, train=True, rngs=rngs) ** 2)

    (l0, g0), (l1, g1) = (jax.value_and_grad(loss)(params, m) for m in (plain, remat))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)
    # and the rematerialized backward pass really recomputes: more matmuls in the gradient program
    jaxprs = [str(jax.make_jaxpr(jax.grad(functools.partial(loss, model=m)))(params)) for m in (plain, remat)]
    assert jaxprs[1].count("dot_general") > jaxprs[0].count("dot_general"), [j.count("dot_general") for j in jaxprs]


@pytest.mark.parametrize(
  "devices, grad_accum, kwargs, opt",
  [
    (1, 1, {}, {}),
    (8, 2, {"rdrop_alpha": 1.0}, {}),
    (8, 1, {"norms": True}, {"ema": 0.9, "layer_decay": 0.8, "clip_norm": 1e-3}),
  ],
)
def test_row_sparse_embedding_gradient_gives_the_dense_step(devices, grad_accum, kwargs, opt):
  """`sparse_embed`: the word embeddings' gradient as the looked-up rows (optim.RowSparse) and the
  fused AdamW's update from it are the dense step's: rows no batch touched bit for bit (moment
  and weight decay alone), the touched rows and everything else to fp32 rounding (duplicates and
  the norm are summed in another order); with dropout, micro-batches, R-Drop, EMA, layer decay
  and clipping that binds."""
  batches = [_batch(seed=s) for s in range(3)]
  mesh = parallel.make_mesh(devices)
  dense, hd = _run(mesh, batches, grad_accum, opt, **kwargs)
  sparse, hs = _run(mesh, batches, grad_accum, opt, sparse_embed=True, **kwargs)
  close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6)
  jax.tree.map(close, dense.params, sparse.params)
  jax.tree.map(close, dense.opt_state, sparse.opt_state)
  for a, b in zip(hd, hs):
    for k in ("loss_sum", "grad_norm", "param_norm", "update_norm"):
      close(a[k], b[k])
  untouched = np.setdiff1d(np.arange(CFG.vocab_size), np.concatenate([b["input_ids"].ravel() for b in batches]))
  assert len(untouched)  # a few of the 100 ids appear in no batch
  table = lambda s: s.params["bert"]["token_embed"]["embedding"][untouched]  # noqa: E731
  np.testing.assert_array_equal(table(dense), table(sparse))
  assert not np.array_equal(table(sparse), _setup()[3].params["bert"]["token_embed"]["embedding"][untouched])


def test_row_sparse_gradient_sums_duplicate_ids():
  ids = jnp.array([[3, 1, 3], [0, 3, 1]])
  rows = jnp.arange(6 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  g = optim.row_sparse(ids, rows, num_rows=5)
  dense = jnp.zeros((5, 2)).at[ids.reshape(-1)].add(rows.reshape(-1, 2))
  np.testing.assert_array_equal(jnp.zeros((5, 2)).at[g.ids].add(g.rows, mode="drop"), dense)
  assert sorted(np.asarray(g.ids).tolist()) == [0, 1, 3, 5, 5, 5]  # unique, then out-of-range fill
  np.testing.assert_allclose(
    optim.tree_norm({"a": g, "b": jnp.ones(3)}), optax.tree.norm({"a": dense, "b": jnp.ones(3)})
  )

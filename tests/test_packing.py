"""Sequence packing for classification: the plan, the model on packed rows, the step, a run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_steps import CFG, CFG_NO_DROPOUT

from configs import glue as glue_cfg
from research import losses, optim, steps, train
from research.data import pipeline
from research.models.bert import BertClassifier, BertConfig


def _encoded(n=40, max_len=20, seed=0, num_labels=2):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, max_len + 1, size=n).astype(np.int32)
  ids = [rng.integers(1, CFG.vocab_size, size=k).astype(np.int32) for k in lengths]
  types = [(np.arange(k) >= k // 2).astype(np.int32) for k in lengths]  # sentence pairs
  labels = rng.integers(0, num_labels, size=n).astype(np.int32)
  enc = pipeline.Encoded(ids, types, lengths, labels)
  enc.extras["teacher_logits"] = rng.normal(size=(n, num_labels)).astype(np.float32)
  return enc


def test_pack_plan_covers_each_example_once_within_row_limits():
  enc = _encoded(n=300, max_len=32)
  rows, length, max_seg = 4, 32, 5
  plan = pipeline.pack_plan(enc.lengths, rows, length, max_seg, seed=3, epoch=1)
  seen = np.concatenate([b[:, 0] for b in plan])
  assert sorted(seen.tolist()) == list(range(300))  # every example exactly once
  for b in plan:
    for r in range(rows):
      ex = b[b[:, 1] == r, 0]
      assert enc.lengths[ex].sum() <= length and len(ex) <= max_seg
  # Deterministic in (seed, epoch); another epoch is another order.
  again = pipeline.pack_plan(enc.lengths, rows, length, max_seg, seed=3, epoch=1)
  assert all((a == b).all() for a, b in zip(plan, again))
  other = pipeline.pack_plan(enc.lengths, rows, length, max_seg, seed=3, epoch=2)
  assert not np.array_equal(seen, np.concatenate([b[:, 0] for b in other]))
  # Dense: well under one row of padding per batch on average.
  assert pipeline.padding_stats(enc, plan, rows, [length])["pad_fraction"] < 0.25
  with pytest.raises(ValueError, match="does not fit a packed row of 16"):
    pipeline.pack_plan(enc.lengths, rows, 16, max_seg, seed=0, epoch=0)


def test_packed_logits_equal_one_example_per_row():
  enc = _encoded(n=12, max_len=10)
  rows, length, max_seg = 3, 24, 4
  plan = pipeline.pack_plan(enc.lengths, rows, length, max_seg, seed=0, epoch=0)[0]
  packed = pipeline.collate_packed(enc, plan, rows, length, max_seg)
  order = plan[np.lexsort((np.arange(len(plan)), plan[:, 1]))][:, 0]  # row-major, as the slots are
  single = pipeline.collate(enc, order, len(order), [length])
  for pooling in ("cls", "mean"):
    model = BertClassifier(CFG, num_labels=2, pooling=pooling)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), ids, ids, ids)["params"]
    got = model.apply({"params": params}, *(packed[k] for k in steps.MODEL_INPUTS[:3]), packed["positions"], max_seg)
    want = model.apply({"params": params}, *(single[k] for k in steps.MODEL_INPUTS[:3]))
    keep = packed["weights"].reshape(-1) > 0
    assert keep.sum() == len(order)
    np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want), atol=2e-5, rtol=1e-5)


def test_packed_train_step_equals_unpacked_on_the_same_examples():
  """Same examples, same parameters, no dropout: the same loss, gradient and update; with R-Drop
  too (without dropout its two passes agree, so it equals the plain step)."""
  enc = _encoded(n=10, max_len=10)
  rows, length, max_seg = 2, 32, 8
  plan = pipeline.pack_plan(enc.lengths, rows, length, max_seg, seed=0, epoch=0)[0]
  packed = pipeline.collate_packed(enc, plan, rows, length, max_seg)
  single = pipeline.collate(enc, plan[:, 0], 16, [length])
  model = BertClassifier(CFG_NO_DROPOUT, num_labels=2)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), ids, ids, ids)["params"]
  oc = glue_cfg.get_config().optimizer
  tx, schedule = optim.make_optimizer(oc, params, 10)
  variants = (("softmax_xent", 0.0), ("distill", 0.0), ("softmax_xent", 1.0))
  out = {}
  for name, batch in (("packed", packed), ("single", single)):
    state = steps.create_state(params, tx, jax.random.PRNGKey(1))
    for loss, rdrop in variants:
      new, m = jax.jit(
        lambda s, b, loss=loss, rdrop=rdrop: steps.train_step(
          s, b, model=model, loss_fn=losses.get_loss(loss), tx=tx, schedule=schedule, rdrop_alpha=rdrop
        )
      )(state, batch)
      out[name, loss, rdrop] = (new.params, m)
  pairs = [(("packed", *v), ("single", *v)) for v in variants]
  pairs.append((("packed", "softmax_xent", 1.0), ("packed", "softmax_xent", 0.0)))
  for a, b in pairs:
    (p1, m1), (p2, m2) = out[a], out[b]
    assert float(m1["count"]) == float(m2["count"]) == len(plan)
    for k in ("loss_sum", "correct", "grad_norm"):
      np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=2e-5, err_msg=f"{a} {b} {k}")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4), p1, p2)


def test_packed_eval_covers_every_example_once():
  enc = _encoded(n=50, max_len=12)
  batches = list(pipeline.eval_batches(enc, batch_size=8, buckets=[16], pack_rows=2, max_segments=4))
  index = np.concatenate([b["index"].reshape(-1) for b in batches])
  assert sorted(index[index >= 0].tolist()) == list(range(50))
  for b in batches:  # each slot's label is its example's
    idx, w = b["index"].reshape(-1), b["weights"].reshape(-1)
    assert ((idx >= 0) == (w > 0)).all()
    np.testing.assert_array_equal(b["labels"].reshape(-1)[idx >= 0], enc.labels[idx[idx >= 0]])


def test_packed_iterator_resumes_exactly():
  enc = _encoded(n=60, max_len=12)
  it = pipeline.TrainIterator(enc, batch_size=16, buckets=[16], seed=1, pack_rows=2, max_segments=6)
  assert it.steps_per_epoch == len(it.plan(0)) and it.examples_per_step == 60 / it.steps_per_epoch
  first = [next(it) for _ in range(it.steps_per_epoch + 2)]  # into the second epoch
  it2 = pipeline.TrainIterator(enc, batch_size=16, buckets=[16], seed=1, pack_rows=2, max_segments=6)
  it2.set_state(first[3][1])
  with pytest.raises(ValueError, match="data.pack_rows=2, pack_max_segments=6 .* but the config has 0"):
    pipeline.TrainIterator(enc, batch_size=16, buckets=[16], seed=1).set_state(first[3][1])
  with pytest.raises(ValueError, match="data.pack_rows=0"):
    it2.set_state({"epoch": 0, "index": 3, "seed": 1})  # an unpacked run's position
  for (b, _), (b2, _) in zip(first[4:], [next(it2) for _ in range(len(first) - 4)]):
    assert all(np.array_equal(b[k], b2[k]) for k in b)
  assert {k: v.shape for k, v in first[0][0].items()} == {
    "input_ids": (2, 16),
    "token_type_ids": (2, 16),
    "attention_mask": (2, 16),
    "positions": (2, 16),
    "labels": (2, 6),
    "weights": (2, 6),
    "teacher_logits": (2, 6, 2),
  }


def test_packed_run_trains_and_reports_packing(small_glue, tmp_path, caplog):
  c = tiny_config(small_glue, **{"data.pack_rows": 8, "data.pack_max_segments": 8})
  with caplog.at_level("INFO"):
    out = train.train_and_evaluate(c, tmp_path / "run")
  assert out["step"] == 8 and np.isfinite(out["final"]["loss"])
  assert any("packed 8 x 32 tokens per step" in r.getMessage() for r in caplog.records)
  lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert any("accuracy" in x for x in lines)
  # Dev was evaluated on packed rows too: the unpacked Predictor scores the same.
  from research import predict

  p = predict.Predictor(tmp_path / "run", step="latest")
  assert predict.predict_split(p, "dev", tmp_path / "pred")["accuracy"] == out["final"]["accuracy"]
  # Continuing it unpacked is refused before anything in the workdir changes.
  ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
  with pytest.raises(ValueError, match="data.pack_rows=8"):
    train.train_and_evaluate(tiny_config(small_glue, num_train_steps=12), tmp_path / "run")
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ckpts
  # The same packed run under pmap: the same dev metrics (dropout off: the bits differ by layout).
  no_drop = {"data.pack_rows": 8, "data.pack_max_segments": 8, "model.hidden_dropout_prob": 0.0}
  no_drop["model.attention_probs_dropout_prob"] = 0.0
  r_jit = train.train_and_evaluate(tiny_config(small_glue, **no_drop), tmp_path / "jit")
  r_pmap = train.train_and_evaluate(tiny_config(small_glue, parallel="pmap", **no_drop), tmp_path / "pmap")
  assert r_jit["final"]["accuracy"] == r_pmap["final"]["accuracy"]
  np.testing.assert_allclose(r_jit["final"]["loss"], r_pmap["final"]["loss"], rtol=1e-5)
  with pytest.raises(ValueError, match="config.data.pack_rows=6 must be divisible by devices"):
    train.train_and_evaluate(tiny_config(small_glue, **{"data.pack_rows": 6}), tmp_path / "bad")


def _model_inputs(packed: bool):
  """A batch of 12 padded examples, or the same packed into 3 rows of 24: (batch, model args)."""
  enc = _encoded(n=12, max_len=10)
  if packed:
    plan = pipeline.pack_plan(enc.lengths, 3, 24, 4, seed=0, epoch=0)[0]
    b = pipeline.collate_packed(enc, plan, 3, 24, 4)
    extra = (b["positions"], 4)
  else:
    b, extra = pipeline.collate(enc, np.arange(12), 12, [16]), ()
  return b, (*(b[k] for k in steps.MODEL_INPUTS[:3]), *extra)


@pytest.mark.parametrize("packed", [False, True])
def test_fused_attention_matches_einsum(packed):
  """config.model.attention=xla (jax.nn.dot_product_attention) computes what the written-out
  softmax does, with padding and with packed rows' block-diagonal mask, forward and backward."""
  b, inputs = _model_inputs(packed)
  out = {}
  for attention in ("einsum", "xla"):
    cfg = BertConfig(**(CFG_NO_DROPOUT.to_dict() | {"attention": attention}))
    model = BertClassifier(cfg, num_labels=2, pooling="mean")
    ids = jnp.zeros((1, 4), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), ids, ids, ids)["params"]
    f = lambda p, model=model: (model.apply({"params": p}, *inputs) ** 2).sum()  # noqa: E731
    out[attention] = (model.apply({"params": params}, *inputs), jax.grad(f)(params))
  keep = b["weights"].reshape(-1) > 0
  np.testing.assert_allclose(out["xla"][0][keep], out["einsum"][0][keep], atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-4), out["xla"][1], out["einsum"][1])


def test_fused_attention_needs_no_attention_dropout():
  with pytest.raises(ValueError, match="attention_probs_dropout_prob=0"):
    train.check_attention(BertConfig(attention="xla"))
  with pytest.raises(ValueError, match="expected einsum, xla, cudnn, auto"):
    train.check_attention(BertConfig(attention="flash"))
  train.check_attention(BertConfig(attention="xla", attention_probs_dropout_prob=0.0))


@pytest.mark.parametrize(
  "packed,attention,remat",
  [(False, "einsum", False), (True, "einsum", False), (True, "xla", False), (False, "einsum", True)],
)
def test_cls_only_last_layer_matches_every_token(packed, attention, remat):
  """pooling=cls runs the last layer for the [CLS] queries alone: the same logits and the
  same gradient as computing every token (with padding, and packed rows' per-example [CLS])."""
  b, inputs = _model_inputs(packed)
  cfg = BertConfig(**(CFG_NO_DROPOUT.to_dict() | {"attention": attention, "remat": remat}))
  out = {}
  for cls_only in (False, True):
    model = BertClassifier(cfg, num_labels=2, pooling="cls", last_layer_cls_only=cls_only)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), ids, ids, ids)["params"]  # the same tree either way
    f = lambda p, model=model: (model.apply({"params": p}, *inputs, train=True) ** 2).sum()  # noqa: E731
    out[cls_only] = (model.apply({"params": params}, *inputs), jax.grad(f)(params))
  keep = b["weights"].reshape(-1) > 0
  np.testing.assert_allclose(out[True][0][keep], out[False][0][keep], atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-4), out[True][1], out[False][1])

"""Fine-tuning strategies, LoRA merging, layer-wise lr decay and distillation."""

import functools
import json

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from test_steps import CFG, _batch

from configs import glue as glue_cfg
from research import finetune, losses, optim, steps, train
from research.data import sources
from research.models.bert import BertClassifier, BertConfig

LORA_CFG = BertConfig(**(CFG.to_dict() | {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ("query", "value")}))


def _params(cfg=CFG):
  ids = jnp.zeros((1, 4), jnp.int32)
  return BertClassifier(cfg, num_labels=2).init(jax.random.PRNGKey(0), ids, ids, ids)["params"]


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree)


def test_lora_merged_equals_unmerged():
  params = _params(LORA_CFG)
  # B starts at 0 (the pretrained function); make it non-zero so the adapters matter.
  flat = {
    p: (jax.random.normal(jax.random.PRNGKey(len(p[1])), v.shape) * 0.1 if p[-1] == "lora_b" else v)
    for p, v in _flat(params).items()
  }
  params = flax.traverse_util.unflatten_dict(flat)
  b = _batch()
  args = (b["input_ids"], b["attention_mask"], b["token_type_ids"])
  unmerged = BertClassifier(LORA_CFG, 2).apply({"params": params}, *args)
  merged_params = finetune.merge_lora(params, LORA_CFG.lora_alpha, LORA_CFG.lora_rank)
  assert not any(p[-1].startswith("lora_") for p in _flat(merged_params))
  merged = BertClassifier(LORA_CFG.without_lora(), 2).apply({"params": merged_params}, *args)
  np.testing.assert_allclose(merged, unmerged, atol=1e-5)
  plain = BertClassifier(CFG, 2).apply({"params": finetune.merge_lora(_params(LORA_CFG), 8.0, 4)}, *args)
  assert np.abs(np.asarray(plain) - np.asarray(merged)).max() > 1e-4  # the adapters changed the function


@pytest.mark.parametrize(
  "strategy,expect",
  [
    ("full", lambda p: True),
    ("frozen", lambda p: p[0] == "classifier"),
    ("top_k", lambda p: p[0] == "classifier" or "layer_1" in p or "pooler" in p),
    ("bitfit", lambda p: p[0] == "classifier" or p[-1] == "bias"),
    ("lora", lambda p: p[0] == "classifier" or p[-1] in ("lora_a", "lora_b")),
  ],
)
def test_strategy_masks_state_and_step(strategy, expect):
  cfg = LORA_CFG if strategy == "lora" else CFG
  params = _params(cfg)
  mask = finetune.trainable_mask(params, strategy, top_k=1)
  assert {p: bool(m) for p, m in _flat(mask).items()} == {p: expect(p) for p in _flat(params)}
  trainable, frozen = finetune.partition(params, mask)
  jax.tree.map(np.testing.assert_array_equal, finetune.combine(trainable, frozen), params)
  tx, schedule = optim.make_optimizer(glue_cfg.get_config().optimizer, trainable, 10)
  state = steps.create_state(params, tx, jax.random.PRNGKey(1), mask)
  # Frozen parameters get no optimizer state: Adam keeps exactly 2 moments per trainable value.
  assert finetune.count(state.opt_state.mu) == finetune.count(trainable)
  step = jax.jit(
    functools.partial(
      steps.train_step, model=BertClassifier(cfg, 2), loss_fn=losses.softmax_xent, tx=tx, schedule=schedule, mask=mask
    )
  )
  for _ in range(3):  # warmup starts at lr 0
    state, _ = step(state, _batch())
  before, after = _flat(params), _flat(state.params)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  trained = {p for p, m in _flat(mask).items() if m}
  assert changed == trained


def test_strategy_errors_are_named():
  with pytest.raises(ValueError, match="top_k=7: expected 1..2"):
    finetune.trainable_mask(_params(), "top_k", top_k=7)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    finetune.trainable_mask(_params(), "lora")
  with pytest.raises(ValueError, match="strategy='partial'"):
    finetune.trainable_mask(_params(), "partial")


def test_layer_wise_lr_decay_scales_updates_by_depth():
  params = _params()
  scales = _flat(optim.layer_lr_scales(params, 0.5, layers=2))
  assert scales[("classifier", "kernel")] == 1.0 and scales[("bert", "pooler", "kernel")] == 1.0
  assert scales[("bert", "layer_1", "mlp_in", "kernel")] == 0.5
  assert scales[("bert", "layer_0", "mlp_in", "kernel")] == 0.25
  assert scales[("bert", "token_embed", "embedding")] == 0.125 and scales[("bert", "embed_norm", "scale")] == 0.125
  oc = glue_cfg.get_config().optimizer
  oc.unlock()
  oc.update(name="sgd", weight_decay=0.0, clip_norm=0.0, warmup_ratio=0.0, schedule="constant", lr=1.0)
  plain, _ = optim.make_optimizer(oc, params, 10)
  oc.layer_decay = 0.5
  decayed, _ = optim.make_optimizer(oc, params, 10)
  grads = jax.tree.map(jnp.ones_like, params)
  u0, _ = plain.update(grads, plain.init(params), params)
  u1, _ = decayed.update(grads, decayed.init(params), params)
  for p, v in _flat(u1).items():
    np.testing.assert_allclose(v, _flat(u0)[p] * scales[p], rtol=1e-6)


def test_distillation_loss_matches_formula_and_gradient():
  from jax.test_util import check_grads

  rng = np.random.default_rng(0)
  s, t = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  y, w = jnp.asarray([0, 2, 1, 1, 0]), jnp.asarray([1.0, 1.0, 1.0, 0.0, 1.0])
  temp, alpha = 3.0, 0.7

  def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  pt = np.exp(log_softmax(t / temp))
  kl = (pt * (log_softmax(t / temp) - log_softmax(s / temp))).sum(-1)
  hard = -log_softmax(s)[np.arange(5), np.asarray(y)]
  want = ((alpha * temp**2 * kl + (1 - alpha) * hard) * np.asarray(w)).sum()
  got, n = losses.distill(logits=s, labels=y, weights=w, teacher_logits=t, temperature=temp, alpha=alpha)
  assert float(got) == pytest.approx(want, rel=1e-5) and float(n) == 4.0
  # Student == teacher and alpha = 1: the loss is at its minimum, 0.
  assert float(losses.distill(logits=t, labels=y, weights=w, teacher_logits=t, alpha=1.0)[0]) == pytest.approx(
    0, abs=1e-5
  )
  f = lambda x: losses.distill(logits=x, labels=y, weights=w, teacher_logits=t, temperature=temp, alpha=alpha)[0]  # noqa: E731
  check_grads(f, (s,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_lora_run_logs_counts_predicts_merged_and_distills(small_glue, tmp_path):
  from research import predict

  c = tiny_config(small_glue, **{"finetune.strategy": "lora", "finetune.lora_rank": 4})
  teacher = train.train_and_evaluate(c, tmp_path / "lora")
  assert teacher["trainable_params"] < teacher["total_params"] / 10
  assert json.loads((tmp_path / "lora" / "summary.json").read_text())["step"] == 8
  p = predict.Predictor(tmp_path / "lora", step="latest")  # adapters merged: a plain BERT
  assert p.bert_cfg.lora_rank == 0 and not any(k[-1].startswith("lora") for k in _flat(p.params))
  assert predict.predict_split(p, "dev", tmp_path / "pred")["accuracy"] == teacher["final"]["accuracy"]
  # The LoRA run is the teacher of a top-1 student.
  s = tiny_config(
    small_glue, loss="distill", teacher=str(tmp_path / "lora"), **{"finetune.strategy": "top_k", "finetune.top_k": 1}
  )
  student = train.train_and_evaluate(s, tmp_path / "student")
  assert student["step"] == 8 and student["trainable_params"] < student["total_params"]
  with pytest.raises(ValueError, match="needs config.teacher"):
    train.train_and_evaluate(tiny_config(small_glue, loss="distill"), tmp_path / "no_teacher")
  # An ensemble teacher: the members' logits averaged, each at the checkpoint its spec names.
  ex = sources.load_split(p.task, "train", source="tsv", glue_dir=small_glue, tfds_data_dir=None)
  ens = train.teacher_logits(
    ml_collections.ConfigDict({"teacher": f"{tmp_path / 'lora'}@latest, {tmp_path / 'student'}"}), ex, p.task
  )
  want = (p.logits(ex) + predict.Predictor(tmp_path / "student").logits(ex)) / 2
  np.testing.assert_allclose(ens, want, rtol=1e-5, atol=1e-6)
  # predict --combine: "ensemble" is that average; "soup" is one model with the averaged weights.
  runs = predict.load_runs(f"{tmp_path / 'lora'}@latest,{tmp_path / 'student'}")
  assert [r.step for r in runs] == [8, predict.Predictor(tmp_path / "student").step]
  np.testing.assert_allclose(predict.combined_logits(runs, ex, "ensemble"), want, rtol=1e-5, atol=1e-6)
  avg = jax.tree.map(lambda a, b: (a + b) / 2, runs[0].params, runs[1].params)
  soup = predict.combined_logits(runs, ex, "soup")
  np.testing.assert_allclose(soup, runs[0].logits(ex, params=avg), rtol=1e-5, atol=1e-6)
  same = [runs[0], runs[0]]  # a soup of one weight set twice is that model
  np.testing.assert_allclose(predict.combined_logits(same, ex, "soup"), p.logits(ex), rtol=1e-5, atol=1e-6)
  with pytest.raises(
    ValueError, match=r"lora@8' and .*lora@latest' are the same checkpoint \(step 8\); it would count twice"
  ):
    predict.load_runs(f"{tmp_path / 'lora'}@latest,{tmp_path / 'lora'}@8")  # listed twice: refused
  runs[1].pooling = "mean"
  with pytest.raises(ValueError, match="one architecture and head: .*pooling mean against cls"):
    predict.combined_logits(runs, ex, "soup")
  runs[1].pooling = runs[0].pooling
  runs[1].params = {**runs[1].params, "extra": {"kernel": np.zeros((2, 3))}}
  with pytest.raises(ValueError, match=r"parameter extra/kernel: \(2, 3\) against none"):
    predict.combined_logits(runs, ex, "soup")

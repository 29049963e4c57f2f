"""Metrics against scikit-learn/scipy; losses against their formulas, with gradients checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import stats
from sklearn import metrics as skm

from research import losses, metrics


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 2, size=200)
  pred = np.where(rng.random(200) < 0.7, label, 1 - label)
  assert metrics.accuracy(pred, label) == pytest.approx(skm.accuracy_score(label, pred))
  assert metrics.f1(pred, label) == pytest.approx(skm.f1_score(label, pred))
  assert metrics.matthews_corr(pred, label) == pytest.approx(skm.matthews_corrcoef(label, pred))


def test_degenerate_mcc_is_zero_like_sklearn():
  label = np.array([0, 1, 0, 1])
  pred = np.zeros(4, int)
  assert metrics.matthews_corr(pred, label) == skm.matthews_corrcoef(label, pred) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
  rng = np.random.default_rng(seed)
  label = np.round(rng.uniform(0, 5, size=300), 1)  # ties, as STS-B scores have
  pred = label + rng.normal(0, 1.0, size=300)
  assert metrics.pearson(pred, label) == pytest.approx(stats.pearsonr(pred, label)[0], abs=1e-9)
  assert metrics.spearman(pred, label) == pytest.approx(stats.spearmanr(pred, label)[0], abs=1e-9)


def _inputs(seed=0, b=6, c=3):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.normal(size=(b, c)), jnp.float32),
    jnp.asarray(rng.integers(0, c, size=b), jnp.int32),
    jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32),
  )


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_losses_match_formulas_and_ignore_weight_zero_rows():
  logits, labels, w = _inputs()
  lp = _log_softmax(logits)
  y = np.asarray(labels)
  nll = -lp[np.arange(6), y]
  wn = np.asarray(w)
  s, n = losses.softmax_xent(logits=logits, labels=labels, weights=w)
  assert (float(s), float(n)) == pytest.approx(((nll * wn).sum(), 4.0), rel=1e-5)

  eps = 0.1
  target = np.full((6, 3), eps / 3)
  target[np.arange(6), y] += 1 - eps
  s, _ = losses.label_smoothing(logits=logits, labels=labels, weights=w, smoothing=eps)
  assert float(s) == pytest.approx((-(target * lp).sum(-1) * wn).sum(), rel=1e-5)

  p_t = np.exp(-nll)
  s, _ = losses.focal(logits=logits, labels=labels, weights=w, gamma=2.0)
  assert float(s) == pytest.approx((((1 - p_t) ** 2) * nll * wn).sum(), rel=1e-5)

  cw = (1.0, 2.0, 0.5)
  s, n = losses.class_weighted_xent(logits=logits, labels=labels, weights=w, class_weights=cw)
  wc = wn * np.asarray(cw)[y]
  assert (float(s), float(n)) == pytest.approx(((nll * wc).sum(), wc.sum()), rel=1e-5)

  pred = logits[:, :1]
  target_r = jnp.asarray([0.5, 1.0, -2.0, 3.0, 9.0, 9.0])
  s, n = losses.mse(logits=pred, labels=target_r, weights=w)
  assert float(s) == pytest.approx((((np.asarray(pred)[:, 0] - np.asarray(target_r)) ** 2) * wn).sum(), rel=1e-5)
  d = np.abs(np.asarray(pred)[:, 0] - np.asarray(target_r))
  hub = np.where(d <= 1.0, 0.5 * d**2, d - 0.5)
  s, _ = losses.huber(logits=pred, labels=target_r, weights=w, delta=1.0)
  assert float(s) == pytest.approx((hub * wn).sum(), rel=1e-5)


@pytest.mark.parametrize("name", ["softmax_xent", "label_smoothing", "focal", "class_weighted_xent"])
def test_loss_gradients_match_finite_differences(name):
  logits, labels, w = _inputs(seed=3)
  fn = losses.get_loss(name)
  f = lambda x: fn(logits=x, labels=labels, weights=w, class_weights=(1.0, 2.0, 0.5))[0]  # noqa: E731
  check_grads(f, (logits,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  g = jax.grad(f)(logits)
  assert np.abs(np.asarray(g)[4:]).max() == 0.0  # weight-0 rows get no gradient

"""Task metrics from exact per-example predictions (already gathered across devices)."""

from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
  return float((pred == label).mean())


def f1(pred: np.ndarray, label: np.ndarray) -> float:
  """Binary F1 of the positive class (1), as GLUE reports for MRPC and QQP."""
  tp = float(((pred == 1) & (label == 1)).sum())
  fp = float(((pred == 1) & (label != 1)).sum())
  fn = float(((pred != 1) & (label == 1)).sum())
  return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corr(pred: np.ndarray, label: np.ndarray) -> float:
  """Matthews correlation for binary labels (CoLA); 0 when undefined, as scikit-learn does."""
  tp = float(((pred == 1) & (label == 1)).sum())
  tn = float(((pred == 0) & (label == 0)).sum())
  fp = float(((pred == 1) & (label == 0)).sum())
  fn = float(((pred == 0) & (label == 1)).sum())
  denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def _rank(x: np.ndarray) -> np.ndarray:
  """Average ranks with ties (as scipy.stats.rankdata)."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  xs = x[order]
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and xs[j + 1] == xs[i]:
      j += 1
    ranks[order[i : j + 1]] = (i + j) / 2 + 1
    i = j + 1
  return ranks


def pearson(pred: np.ndarray, label: np.ndarray) -> float:
  p, y = pred.astype(np.float64) - pred.mean(), label.astype(np.float64) - label.mean()
  denom = np.sqrt((p * p).sum() * (y * y).sum())
  return 0.0 if denom == 0 else float((p * y).sum() / denom)


def spearman(pred: np.ndarray, label: np.ndarray) -> float:
  return pearson(_rank(pred), _rank(label))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_corr": matthews_corr, "pearson": pearson, "spearman": spearman}


def predictions(logits: np.ndarray, regression: bool) -> np.ndarray:
  return logits[:, 0] if regression else logits.argmax(-1)


def compute(names: tuple[str, ...], logits: np.ndarray, labels: np.ndarray, regression: bool) -> dict[str, float]:
  pred = predictions(logits, regression)
  return {n: METRICS[n](pred, labels) for n in names}

"""The GLUE task registry: columns, labels, default loss and metrics, as data.

Local folders follow the layout of GLUE's `download_glue_data.py` (and `../shared/data/glue`):
a folder per task (`SST-2` or `sst2`) holding train/dev/test TSVs.
"""

from __future__ import annotations

import dataclasses
import difflib


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  folders: tuple[str, ...]  # candidate folder names under a GLUE root
  text_columns: tuple[str, ...]  # one (single sentence) or two (pair) header names
  label_column: str
  labels: tuple[str, ...] | None  # None: regression
  metrics: tuple[str, ...]  # the first is the main one (model selection, early stopping)
  tfds_name: str
  tfds_columns: tuple[str, ...] = ()  # TFDS feature names for the texts, when they differ
  dev_splits: tuple[str, ...] = ("dev",)  # local file stems; TFDS uses "validation..."
  # Files without a header name their columns by position.
  header: tuple[str, ...] | None = None
  # utf-8-sig: UTF-8 that also drops a leading byte-order mark (MRPC's files have one, and so do
  # files saved by Excel or Notepad), which would otherwise stick to the first column's name.
  encoding: str = "utf-8-sig"
  # TFDS's ClassLabel names for our labels, in our order, where TFDS names them differently
  # (TFDS sst2 says "negative"/"positive" where the TSVs say 0/1); empty: the same names.
  tfds_labels: tuple[str, ...] = ()

  @property
  def tfds_text_columns(self) -> tuple[str, ...]:
    return self.tfds_columns or self.text_columns

  @property
  def is_regression(self) -> bool:
    return self.labels is None

  @property
  def num_labels(self) -> int:
    return 1 if self.labels is None else len(self.labels)

  @property
  def default_loss(self) -> str:
    return "mse" if self.is_regression else "softmax_xent"


TASKS: dict[str, Task] = {
  t.name: t
  for t in [
    Task(
      "cola",
      ("CoLA", "cola"),
      ("sentence",),
      "label",
      ("0", "1"),
      ("matthews_corr", "accuracy"),
      "glue/cola",
      tfds_labels=("unacceptable", "acceptable"),
      header=("source", "label", "original_mark", "sentence"),
    ),
    Task(
      "sst2",
      ("SST-2", "sst2"),
      ("sentence",),
      "label",
      ("0", "1"),
      ("accuracy",),
      "glue/sst2",
      tfds_labels=("negative", "positive"),
    ),
    Task(
      "mrpc",
      ("MRPC", "mrpc"),
      ("#1 String", "#2 String"),
      "Quality",
      ("0", "1"),
      ("f1", "accuracy"),
      "glue/mrpc",
      tfds_columns=("sentence1", "sentence2"),
      tfds_labels=("not_equivalent", "equivalent"),
    ),
    Task(
      "qqp",
      ("QQP", "qqp"),
      ("question1", "question2"),
      "is_duplicate",
      ("0", "1"),
      ("f1", "accuracy"),
      "glue/qqp",
      tfds_labels=("not_duplicate", "duplicate"),
    ),
    Task("stsb", ("STS-B", "stsb"), ("sentence1", "sentence2"), "score", None, ("pearson", "spearman"), "glue/stsb"),
    Task(
      "mnli",
      ("MNLI", "mnli"),
      ("sentence1", "sentence2"),
      "gold_label",
      ("contradiction", "entailment", "neutral"),
      ("accuracy",),
      "glue/mnli",
      tfds_columns=("premise", "hypothesis"),
      dev_splits=("dev_matched", "dev_mismatched"),
    ),
    Task(
      "qnli",
      ("QNLI", "qnli"),
      ("question", "sentence"),
      "label",
      ("entailment", "not_entailment"),
      ("accuracy",),
      "glue/qnli",
    ),
    Task(
      "rte",
      ("RTE", "rte"),
      ("sentence1", "sentence2"),
      "label",
      ("entailment", "not_entailment"),
      ("accuracy",),
      "glue/rte",
    ),
    Task(
      "wnli",
      ("WNLI", "wnli"),
      ("sentence1", "sentence2"),
      "label",
      ("0", "1"),
      ("accuracy",),
      "glue/wnli",
      tfds_labels=("not_entailment", "entailment"),
    ),
  ]
}


def get_task(name: str) -> Task:
  if name not in TASKS:
    near = difflib.get_close_matches(name, TASKS, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ValueError(f"config.task={name!r}: unknown task (GLUE tasks: {', '.join(TASKS)}){hint}")
  return TASKS[name]

"""Where examples come from: local GLUE-format TSV folders (offline) or TFDS.

Every reader validates as it goes, and a bad row is reported by file and line:
a wrong number of columns, an empty text, or a label outside the task's label set.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

from research.data.tasks import Task

UNLABELED = -1  # test splits carry no labels (regression: NaN)


class DataError(ValueError):
  """Bad or missing data, naming the file and line where it can."""


@dataclasses.dataclass
class Examples:
  texts: list[tuple[str, ...]]  # one tuple of 1 or 2 texts per example
  labels: np.ndarray  # int32 class ids, or float32 scores for regression
  origin: str  # file or dataset name, for messages

  def __len__(self) -> int:
    return len(self.texts)

  def take(self, n: int) -> Examples:
    return Examples(self.texts[:n], self.labels[:n], self.origin)


def default_glue_dir() -> str:
  """$GLUE_DIR, else ../shared/data/glue beside the checkout (the offline copy)."""
  if os.environ.get("GLUE_DIR"):
    return os.environ["GLUE_DIR"]
  return str(Path(__file__).resolve().parents[3] / "shared" / "data" / "glue")


def find_task_dir(glue_dir: str | Path, task: Task) -> Path:
  root = Path(glue_dir).expanduser()
  if not root.is_dir():
    raise DataError(f"GLUE data dir {str(root)!r} does not exist (set config.data.glue_dir or $GLUE_DIR)")
  if (root / "train.tsv").is_file():  # pointed straight at the task folder
    return root
  for name in task.folders:
    if (root / name).is_dir():
      return root / name
  raise DataError(f"{root}: no folder for task {task.name!r} (looked for {', '.join(task.folders)})")


def read_glue_tsv(path: Path, task: Task) -> Examples:
  """Read one GLUE TSV; quoting is off because GLUE sentences contain bare quotes."""
  if not path.is_file():
    raise DataError(f"{path}: no such file")
  csv.field_size_limit(sys.maxsize)
  texts, labels = [], []
  with open(path, encoding=task.encoding, newline="") as f:
    rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    first = next(rows, None)
    if first is None:
      raise DataError(f"{path}: empty file")
    # CoLA's train/dev have no header; its test file does ("index", "sentence").
    if task.header is not None and first[0] != "index":
      columns, data_start, pending = list(task.header), 1, [first]
    else:
      columns, data_start, pending = first, 2, []
    missing = [c for c in task.text_columns if c not in columns]
    if missing:
      raise DataError(f"{path}:1: header {columns} lacks column(s) {missing} for task {task.name!r}")
    text_idx = [columns.index(c) for c in task.text_columns]
    label_idx = columns.index(task.label_column) if task.label_column in columns else None
    label_ids = {name: i for i, name in enumerate(task.labels or ())}

    def parse(lineno: int, row: list[str]) -> None:
      if len(row) != len(columns):
        raise DataError(f"{path}:{lineno}: expected {len(columns)} tab-separated columns {columns}, got {len(row)}")
      t = tuple(row[i].strip() for i in text_idx)
      for c, v in zip(task.text_columns, t):
        if not v:
          raise DataError(f"{path}:{lineno}: empty text in column {c!r}")
      texts.append(t)
      labels.append(_label(None if label_idx is None else row[label_idx], task, label_ids, f"{path}:{lineno}"))

    for lineno, row in enumerate(pending, start=1):
      parse(lineno, row)
    for lineno, row in enumerate(rows, start=data_start):
      if row:  # a trailing blank line is not an example
        parse(lineno, row)
  if not texts:
    raise DataError(f"{path}: no examples")
  dtype = np.float32 if task.is_regression else np.int32
  return Examples(texts, np.asarray(labels, dtype), str(path))


def _label(value: str | None, task: Task, label_ids: dict[str, int], where: str) -> float | int:
  """One row's label: a float (regression), a class id, or the unlabeled marker (a test file)."""
  if value is None:
    return np.nan if task.is_regression else UNLABELED
  if task.is_regression:
    try:
      return float(value)
    except ValueError:
      raise DataError(f"{where}: label {value!r} is not a number") from None
  if value not in label_ids:
    raise DataError(f"{where}: unknown label {value!r}; expected one of {list(task.labels)}")
  return label_ids[value]


def _tfds_split(task: Task, split: str) -> str:
  if split == "dev":
    return "validation"
  if split.startswith("dev_"):
    return "validation_" + split.removeprefix("dev_")
  return split


def read_tfds(task: Task, split: str, data_dir: str | None) -> Examples:
  """Read a prepared TFDS GLUE split through `tfds.data_source` (random access, no TF graph)."""
  import tensorflow_datasets as tfds

  name = f"{task.tfds_name}:{split}"
  try:
    builder = tfds.builder(task.tfds_name, data_dir=data_dir)
    source = tfds.data_source(task.tfds_name, split=_tfds_split(task, split), data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types for "not prepared"
    raise DataError(f"TFDS {name} is not available in data_dir={data_dir!r}: {e}") from e
  # Map TFDS label ids to ours by name: TFDS orders MNLI's labels differently, and names
  # SST-2's "negative"/"positive" where the TSVs say 0/1 (task.tfds_labels).
  names = builder.info.features["label"].names if not task.is_regression else None
  ours = task.tfds_labels or task.labels
  if names and sorted(names) != sorted(ours):
    raise DataError(f"TFDS {name}: label names {names} do not match the task's {list(ours)}")
  remap = {i: ours.index(n) for i, n in enumerate(names)} if names else None
  texts, labels = [], []
  for i in range(len(source)):
    r = source[i]
    t = tuple(
      r[c].decode("utf-8").strip() if isinstance(r[c], bytes) else str(r[c]).strip() for c in task.tfds_text_columns
    )
    if not all(t):
      raise DataError(f"{name}: example {i} has an empty text")
    texts.append(t)
    lab = r["label"]
    labels.append(float(lab) if task.is_regression else (UNLABELED if lab < 0 else remap[int(lab)]))
  return Examples(texts, np.asarray(labels, np.float32 if task.is_regression else np.int32), name)


def load_split(task: Task, split: str, *, source: str, glue_dir: str, tfds_data_dir: str | None) -> Examples:
  """`source` is "tsv", "tfds", or "auto" (a local folder if there is one, else TFDS)."""
  if source not in ("auto", "tsv", "tfds"):
    raise DataError(f"config.data.source={source!r}: expected auto, tsv or tfds")
  if source == "auto":
    source = "tsv" if glue_dir and Path(glue_dir).expanduser().is_dir() else "tfds"
  if source == "tfds":
    return read_tfds(task, split, tfds_data_dir or None)
  return read_glue_tsv(find_task_dir(glue_dir, task) / f"{split}.tsv", task)

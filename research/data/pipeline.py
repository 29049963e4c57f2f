"""Tokenize, bucket by length, batch. Yields dicts of numpy arrays of a few fixed shapes.

Training: each epoch is a seeded permutation; windows of `sort_window` batches are sorted
by length and cut into batches, whose order is shuffled again. Every batch is padded to
the smallest bucket that holds its longest row, so XLA compiles once per bucket. The
iterator's position, `{"epoch", "index"}`, is a pure function of (seed, epoch), so it
goes into the checkpoint and a restored run sees exactly the batches it would have.

Eval: every example exactly once, sorted by length; rows that pad the last batch carry
`weights = 0`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from research.data.sources import Examples


@dataclasses.dataclass
class Encoded:
  input_ids: list[np.ndarray]  # ragged, int32
  token_type_ids: list[np.ndarray]
  lengths: np.ndarray  # int32 [N]
  labels: np.ndarray  # [N]
  # Per-example arrays [N, ...] batched beside the labels, e.g. `teacher_logits`.
  extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.lengths)


def encode(examples: Examples, tokenizer, max_length: int) -> Encoded:
  """WordPiece with the checkpoint's own (fast) tokenizer; pairs get token types 0/1."""
  cols = list(zip(*examples.texts))
  out = tokenizer(*cols, truncation=True, max_length=max_length, return_attention_mask=False)
  ids = [np.asarray(x, np.int32) for x in out["input_ids"]]
  types = [np.asarray(x, np.int32) for x in out["token_type_ids"]]
  return Encoded(ids, types, np.asarray([len(x) for x in ids], np.int32), examples.labels)


def bucket_lengths(buckets: tuple[int, ...] | list[int], max_length: int) -> list[int]:
  """Sorted bucket sizes capped at max_length, which is always the last bucket."""
  return sorted({b for b in buckets if b < max_length} | {max_length})


def _bucket(n: int, buckets: list[int]) -> int:
  return buckets[int(np.searchsorted(buckets, n))]


def collate(enc: Encoded, idx: np.ndarray, rows: int, buckets: list[int]) -> dict[str, np.ndarray]:
  """Pack examples `idx` into `rows` rows padded to one bucket; missing rows get weight 0."""
  length = _bucket(int(enc.lengths[idx].max()), buckets)
  ids = np.zeros((rows, length), np.int32)
  types = np.zeros((rows, length), np.int32)
  mask = np.zeros((rows, length), np.int32)
  labels = np.zeros((rows,), enc.labels.dtype)
  weights = np.zeros((rows,), np.float32)
  for r, i in enumerate(idx):
    n = enc.lengths[i]
    ids[r, :n], types[r, :n], mask[r, :n] = enc.input_ids[i], enc.token_type_ids[i], 1
  labels[: len(idx)] = enc.labels[idx]
  weights[: len(idx)] = 1.0
  batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels, "weights": weights}
  for k, v in enc.extras.items():
    batch[k] = np.zeros((rows, *v.shape[1:]), v.dtype)
    batch[k][: len(idx)] = v[idx]
  return batch


def epoch_plan(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, sort_window: int) -> list[np.ndarray]:
  """The batches (as example indices) of one training epoch; deterministic in (seed, epoch)."""
  rng = np.random.default_rng([seed, epoch])
  perm = rng.permutation(len(lengths))
  batches = []
  window = batch_size * max(sort_window, 1)
  for start in range(0, len(perm), window):
    chunk = perm[start : start + window]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
  order = rng.permutation(len(batches))
  return [batches[i] for i in order]


class TrainIterator:
  """Endless, checkpointable iterator over training batches for this process.

  Every process computes the same global plan and keeps its own contiguous slice of
  rows, which `jax.make_array_from_process_local_data` stitches into the global batch.
  """

  def __init__(
    self,
    enc: Encoded,
    *,
    batch_size: int,
    buckets: list[int],
    seed: int,
    sort_window: int = 64,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} processes")
    self.enc, self.batch_size, self.buckets = enc, batch_size, buckets
    self.seed, self.sort_window = seed, sort_window
    self.rows = slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)
    self.epoch, self.index = 0, 0
    self._plan, self._plan_epoch = None, -1

  @property
  def steps_per_epoch(self) -> int:
    return -(-len(self.enc) // self.batch_size)

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

  def set_state(self, state: dict[str, int]) -> None:
    if state.get("seed", self.seed) != self.seed:
      raise ValueError(f"checkpointed data seed {state['seed']} != config seed {self.seed}")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])

  def plan(self, epoch: int) -> list[np.ndarray]:
    if self._plan_epoch != epoch:
      self._plan = epoch_plan(self.enc.lengths, self.batch_size, self.seed, epoch, self.sort_window)
      self._plan_epoch = epoch
    return self._plan

  def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, int]]]:
    return self

  def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The next batch (this process's rows) and the iterator state after it."""
    plan = self.plan(self.epoch)
    batch = collate(self.enc, plan[self.index], self.batch_size, self.buckets)
    self.index += 1
    if self.index == len(plan):
      self.epoch, self.index = self.epoch + 1, 0
    return {k: v[self.rows] for k, v in batch.items()}, self.get_state()


def eval_batches(
  enc: Encoded, *, batch_size: int, buckets: list[int], process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once, sorted by length; padded rows have weight 0.

  Each batch also carries `index`, the example ids of its rows (-1 for padding), so
  predictions can be put back in dataset order.
  """
  order = np.argsort(enc.lengths, kind="stable")
  rows = slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    batch = collate(enc, idx, batch_size, buckets)
    batch["index"] = np.full((batch_size,), -1, np.int32)
    batch["index"][: len(idx)] = idx
    yield {k: v[rows] for k, v in batch.items()}


def padding_stats(enc: Encoded, plan: list[np.ndarray], batch_size: int, buckets: list[int]) -> dict[str, float]:
  """Fraction of the tokens the model computes on that are padding, with and without buckets."""
  real = sum(int(enc.lengths[b].sum()) for b in plan)
  bucketed = sum(batch_size * _bucket(int(enc.lengths[b].max()), buckets) for b in plan)
  fixed = len(plan) * batch_size * buckets[-1]
  return {"pad_fraction": 1 - real / bucketed, "pad_fraction_unbucketed": 1 - real / fixed}

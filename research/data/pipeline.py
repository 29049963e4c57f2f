"""Tokenize, bucket by length, batch. Yields dicts of numpy arrays of a few fixed shapes.

Training: each epoch is a seeded permutation; windows of `sort_window` batches are sorted
by length and cut into batches, whose order is shuffled again. Every batch is padded to
the smallest bucket that holds its longest row, so XLA compiles once per bucket. The
iterator's position, `{"epoch", "index"}`, is a pure function of (seed, epoch), so it
goes into the checkpoint and a restored run sees exactly the batches it would have.

Packing (training, `pack_rows > 0`): instead of one example per row, each batch is
`pack_rows` rows of `max_length` tokens holding as many whole examples as fit, in the epoch's
seeded order (first fit; a batch closes when the next example fits in none of its rows).
One shape for the whole run, so one compiled program, and almost no padding; the number of
examples per step varies around `pack_rows * max_length / mean length`. Rows carry
`attention_mask` = the example's number within the row (1..S, 0 = padding) and `positions`
(restarting at each example); labels, weights and extras are RxS (S = `max_segments`).

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


def pack_plan(
  lengths: np.ndarray, rows: int, length: int, max_segments: int, seed: int, epoch: int
) -> list[np.ndarray]:
  """The packed batches of one epoch: for each, an int array of (example, row) pairs.

  Examples come in the same seeded permutation as `epoch_plan`'s. Deterministic in (seed, epoch).
  """
  return first_fit(lengths, np.random.default_rng([seed, epoch]).permutation(len(lengths)), rows, length, max_segments)


def first_fit(lengths: np.ndarray, order: np.ndarray, rows: int, length: int, max_segments: int) -> list[np.ndarray]:
  """Examples in `order`, each to the first row with room for it (and fewer than
  `max_segments` examples); when none has room the batch is closed and the example opens the
  next. Returns, per batch, an int array of (example, row) pairs."""
  if len(lengths) and int(lengths.max()) > length:
    raise ValueError(f"an example of {int(lengths.max())} tokens does not fit a packed row of {length}")
  batches, cur = [], []
  fill, segs = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
  for i in order:
    n = lengths[i]
    room = np.flatnonzero((fill + n <= length) & (segs < max_segments))
    if not len(room):
      batches.append(np.asarray(cur, np.int64))
      cur, fill[:], segs[:] = [], 0, 0
      room = [0]
    r = room[0]
    cur.append((i, r))
    fill[r] += n
    segs[r] += 1
  if cur:
    batches.append(np.asarray(cur, np.int64))
  return batches


def collate_packed(
  enc: Encoded, pairs: np.ndarray, rows: int, length: int, max_segments: int, with_index: bool = False
) -> dict:
  """Rows of whole examples, as `pack_plan` assigned them (see the module docstring);
  `with_index` adds `index`, RxS: each slot's example id (-1 = empty), for evaluation."""
  ids = np.zeros((rows, length), np.int32)
  types = np.zeros((rows, length), np.int32)
  seg = np.zeros((rows, length), np.int32)
  pos = np.zeros((rows, length), np.int32)
  labels = np.zeros((rows, max_segments), enc.labels.dtype)
  weights = np.zeros((rows, max_segments), np.float32)
  extras = {k: np.zeros((rows, max_segments, *v.shape[1:]), v.dtype) for k, v in enc.extras.items()}
  index = np.full((rows, max_segments), -1, np.int32)
  fill, segs = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
  for i, r in pairs:
    n, o, s = enc.lengths[i], fill[r], segs[r]
    index[r, s] = i
    ids[r, o : o + n], types[r, o : o + n] = enc.input_ids[i], enc.token_type_ids[i]
    seg[r, o : o + n], pos[r, o : o + n] = s + 1, np.arange(n)
    labels[r, s], weights[r, s] = enc.labels[i], 1.0
    for k, v in enc.extras.items():
      extras[k][r, s] = v[i]
    fill[r] += n
    segs[r] += 1
  batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": seg, "positions": pos}
  return batch | {"labels": labels, "weights": weights} | extras | ({"index": index} if with_index else {})


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
    pack_rows: int = 0,
    max_segments: int = 32,
  ):
    """`pack_rows > 0` packs examples into that many rows of `buckets[-1]` tokens (module
    docstring); `batch_size` is then unused."""
    rows = pack_rows or batch_size
    if rows % process_count:
      raise ValueError(
        f"{'pack_rows' if pack_rows else 'batch_size'} {rows} is not divisible by the {process_count} processes"
      )
    self.enc, self.batch_size, self.buckets = enc, batch_size, buckets
    self.seed, self.sort_window = seed, sort_window
    self.pack_rows, self.max_segments = pack_rows, max_segments
    self.rows = slice(process_index * rows // process_count, (process_index + 1) * rows // process_count)
    self.epoch, self.index = 0, 0
    self._plan, self._plan_epoch = None, -1

  @property
  def steps_per_epoch(self) -> int:
    """Packed: epoch 0's count (later epochs differ by a step or two)."""
    return len(self.plan(0)) if self.pack_rows else -(-len(self.enc) // self.batch_size)

  @property
  def examples_per_step(self) -> float:
    return len(self.enc) / self.steps_per_epoch if self.pack_rows else float(self.batch_size)

  def get_state(self) -> dict[str, int]:
    state = {"epoch": self.epoch, "index": self.index, "seed": self.seed}
    return state | ({"pack_rows": self.pack_rows, "max_segments": self.max_segments} if self.pack_rows else {})

  def set_state(self, state: dict[str, int]) -> None:
    if state.get("seed", self.seed) != self.seed:
      raise ValueError(f"checkpointed data seed {state['seed']} != config seed {self.seed}")
    saved = (int(state.get("pack_rows", 0)), int(state.get("max_segments", self.max_segments)))
    if saved[0] != self.pack_rows or (self.pack_rows and saved[1] != self.max_segments):
      raise ValueError(
        f"the checkpoint's data position is for data.pack_rows={saved[0]}, pack_max_segments={saved[1]} "
        f"(0 = unpacked), but the config has {self.pack_rows}, {self.max_segments}: its batches would differ. "
        "Resume with the checkpoint's values, or use a new --workdir."
      )
    self.epoch, self.index = int(state["epoch"]), int(state["index"])

  def plan(self, epoch: int) -> list[np.ndarray]:
    if self._plan_epoch != epoch:
      if self.pack_rows:
        self._plan = pack_plan(self.enc.lengths, self.pack_rows, self.buckets[-1], self.max_segments, self.seed, epoch)
      else:
        self._plan = epoch_plan(self.enc.lengths, self.batch_size, self.seed, epoch, self.sort_window)
      self._plan_epoch = epoch
    return self._plan

  def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, int]]]:
    return self

  def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The next batch (this process's rows) and the iterator state after it."""
    plan = self.plan(self.epoch)
    if self.pack_rows:
      batch = collate_packed(self.enc, plan[self.index], self.pack_rows, self.buckets[-1], self.max_segments)
    else:
      batch = collate(self.enc, plan[self.index], self.batch_size, self.buckets)
    self.index += 1
    if self.index == len(plan):
      self.epoch, self.index = self.epoch + 1, 0
    return {k: v[self.rows] for k, v in batch.items()}, self.get_state()


def eval_batches(
  enc: Encoded,
  *,
  batch_size: int,
  buckets: list[int],
  process_index: int = 0,
  process_count: int = 1,
  pack_rows: int = 0,
  max_segments: int = 32,
) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once, sorted by length; padded rows have weight 0.

  Each batch also carries `index`, the example ids of its rows (-1 for padding), so
  predictions can be put back in dataset order. `pack_rows > 0`: packed rows of `buckets[-1]`
  tokens as in training (one program), `index` per example slot, RxS.
  """
  order = np.argsort(enc.lengths, kind="stable")
  if pack_rows:
    rows = slice(process_index * pack_rows // process_count, (process_index + 1) * pack_rows // process_count)
    for pairs in first_fit(enc.lengths, order, pack_rows, buckets[-1], max_segments):
      batch = collate_packed(enc, pairs, pack_rows, buckets[-1], max_segments, with_index=True)
      yield {k: v[rows] for k, v in batch.items()}
    return
  rows = slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    batch = collate(enc, idx, batch_size, buckets)
    batch["index"] = np.full((batch_size,), -1, np.int32)
    batch["index"][: len(idx)] = idx
    yield {k: v[rows] for k, v in batch.items()}


def padding_stats(enc: Encoded, plan: list[np.ndarray], batch_size: int, buckets: list[int]) -> dict[str, float]:
  """Fraction of the tokens the model computes on that are padding, with and without buckets
  (packed plans: with packing, and without it at `batch_size` rows of the longest length)."""
  if plan and plan[0].ndim == 2:  # packed: (example, row) pairs
    real = int(enc.lengths.sum())
    packed = len(plan) * batch_size * buckets[-1]
    return {"pad_fraction": 1 - real / packed, "pad_fraction_unbucketed": 1 - real / (len(enc) * buckets[-1])}
  real = sum(int(enc.lengths[b].sum()) for b in plan)
  bucketed = sum(batch_size * _bucket(int(enc.lengths[b].max()), buckets) for b in plan)
  fixed = len(plan) * batch_size * buckets[-1]
  return {"pad_fraction": 1 - real / bucketed, "pad_fraction_unbucketed": 1 - real / fixed}

"""Language-model data: a text corpus -> token stream -> packed fixed-length sequences.

Documents (non-empty lines or paragraphs, as the config says) are tokenized and joined
into one stream, each followed by the tokenizer's separator token (`[SEP]` for WordPiece,
`<|endoftext|>` for BPE, nothing for characters), so there is no padding: document
boundaries are marked by separators, not by the attention mask. The stream is cut into
windows of `seq_len + 1` tokens (inputs and next-token targets).

Training: each epoch starts at a seeded random offset in [0, seq_len) and visits the windows
in a seeded permutation, so every epoch sees new alignments; the position `{epoch, index}`
goes into the checkpoint like the fine-tuning pipeline's. Eval: consecutive windows from the
start, every token predicted exactly once; rows that pad the last batch have weight 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class CharTokenizer:
  """One id per character of the training text (nanoGPT's shakespeare_char)."""

  FILE = "char_vocab.json"

  def __init__(self, chars: list[str]):
    self.chars = chars
    self.index = {c: i for i, c in enumerate(chars)}

  @classmethod
  def train(cls, text: str) -> CharTokenizer:
    return cls(sorted(set(text)))

  def __len__(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> list[int]:
    missing = sorted(set(text) - set(self.index))
    if missing:
      raise ValueError(f"characters not in the vocabulary (the training corpus's): {missing[:10]}")
    return [self.index[c] for c in text]

  def decode(self, ids) -> str:
    return "".join(self.chars[i] for i in ids)

  def save(self, folder: str | Path) -> None:
    from research.writers import write_atomic

    Path(folder).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(folder) / self.FILE, json.dumps({"chars": self.chars}))

  @classmethod
  def load(cls, folder: str | Path) -> CharTokenizer:
    return cls(json.loads((Path(folder) / cls.FILE).read_text())["chars"])


def load_tokenizer(folder: str | Path):
  """The tokenizer a pretraining run saved in its workdir (`tokenizer/`)."""
  folder = Path(folder) / "tokenizer"
  if (folder / CharTokenizer.FILE).exists():
    return CharTokenizer.load(folder)
  import transformers

  return transformers.AutoTokenizer.from_pretrained(str(folder))


def read_text(paths: str, key: str = "config.data.train_files") -> str:
  """Comma-separated text files, concatenated. Errors name the config key and the file."""
  parts = []
  for p in filter(None, (s.strip() for s in paths.split(","))):
    path = Path(p)
    if not path.is_file():
      raise FileNotFoundError(f"{key}: {path} does not exist")
    try:
      parts.append(path.read_text(encoding="utf-8-sig"))  # a leading byte-order mark is not text
    except UnicodeDecodeError as e:
      raise ValueError(f"{key}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
  if not parts:
    raise ValueError(f"{key} is empty")
  return "".join(parts)


def documents(text: str, unit: str) -> list[str]:
  """Split into documents: "lines" (non-empty lines) or "paragraphs" (blank-line separated)."""
  if unit == "lines":
    return [ln.strip() for ln in text.splitlines() if ln.strip()]
  if unit == "paragraphs":
    return [p.strip() for p in text.split("\n\n") if p.strip()]
  raise ValueError(f"config.data.document={unit!r}: expected 'lines' or 'paragraphs'")


def tokenize_stream(text: str, tokenizer, unit: str = "lines") -> np.ndarray:
  """Token ids of the whole corpus as one int32 stream (documents end with a separator)."""
  if isinstance(tokenizer, CharTokenizer):
    return np.asarray(tokenizer.encode(text), np.int32)
  sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
  if sep is None:
    raise ValueError("the tokenizer has neither a sep nor an eos token to mark document boundaries")
  docs = documents(text, unit)
  ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
  out = np.empty(sum(len(x) + 1 for x in ids), np.int32)
  pos = 0
  for x in ids:
    out[pos : pos + len(x)] = x
    out[pos + len(x)] = sep
    pos += len(x) + 1
  return out


class MaskedLM:
  """BERT's masking: choose `prob` of the (non-special) tokens; of those, 80% become [MASK],
  10% a random token, 10% stay. Labels are the original ids and the loss weight is 1 only at
  chosen positions. `whole_word`: a word's "##" pieces are chosen with its first piece.
  `count`: "bernoulli" chooses each token (word) independently with probability `prob`, as
  Hugging Face's DataCollatorForLanguageModeling; "exact" chooses round(prob x candidates)
  per row, as Google's create_pretraining_data.py, so that the head's prediction slots per row
  drop from ~1.5 x prob x L (room for the spread) to prob x L (20 instead of 33 at L = 128).
  The randomness is a pure function of `key`, so a resumed run masks the same way."""

  COUNTS = ("bernoulli", "exact")

  def __init__(self, tokenizer, prob: float = 0.15, whole_word: bool = False, count: str = "bernoulli"):
    if tokenizer.mask_token_id is None:
      raise ValueError("masked LM needs a tokenizer with a [MASK] token (a WordPiece tokenizer)")
    if count not in self.COUNTS:
      raise ValueError(f"config.data.mask_count={count!r}: expected one of {', '.join(self.COUNTS)}")
    if not 0.0 < prob < 1.0:  # 0 masks nothing: the loss is over no token and reads 0
      raise ValueError(f"config.data.mask_prob={prob}: expected 0 < mask_prob < 1")
    self.prob, self.whole_word, self.count = prob, whole_word, count
    self.mask_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)
    self.special = np.zeros(self.vocab_size, bool)
    self.special[[i for i in tokenizer.all_special_ids if i is not None and i < self.vocab_size]] = True
    self.continuation = np.zeros(self.vocab_size, bool)
    for token, i in tokenizer.get_vocab().items():
      if token.startswith("##") and i < self.vocab_size:
        self.continuation[i] = True

  def __call__(self, ids_BxL: np.ndarray, valid_BxL: np.ndarray, key: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(key)
    b, seq = ids_BxL.shape
    candidate = valid_BxL & ~self.special[ids_BxL]
    draw = rng.random(ids_BxL.shape)
    word_BxL = np.broadcast_to(np.arange(seq), (b, seq))  # each token its own word ...
    if self.whole_word:  # ... or one draw per word, read by its "##" pieces from the word's first piece
      starts = ~self.continuation[ids_BxL]
      word_BxL = np.maximum.accumulate(np.where(starts, word_BxL, 0), axis=1)
      draw = np.take_along_axis(draw, word_BxL, axis=1)
    # At most P predictions per row (as BERT's max_predictions_per_seq): the head runs on
    # BxP gathered positions instead of BxL, which matters with a 30k vocabulary.
    p = self.max_predictions(seq)
    if self.count == "exact":
      chosen = self._choose_exact(candidate, draw, word_BxL, p)
    else:
      chosen = candidate & (draw < self.prob)
      chosen &= np.cumsum(chosen, axis=1) <= p
    action = rng.random(ids_BxL.shape)
    inputs = ids_BxL.copy()
    inputs[chosen & (action < 0.8)] = self.mask_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    inputs[swap] = rng.integers(0, self.vocab_size, size=int(swap.sum()))
    positions = np.zeros((b, p), np.int32)
    weights = np.zeros((b, p), np.float32)
    rows, cols = np.nonzero(chosen)
    slot = (np.cumsum(chosen, axis=1) - 1)[rows, cols]
    positions[rows, slot], weights[rows, slot] = cols, 1.0
    return {
      "input_ids": inputs.astype(np.int32),
      "attention_mask": valid_BxL.astype(np.int32),
      "token_type_ids": np.zeros_like(inputs, np.int32),
      "masked_positions": positions,
      "labels": np.take_along_axis(ids_BxL, positions, axis=1).astype(np.int32),
      "weights": weights,
    }

  def _choose_exact(self, candidate_BxL, draw_BxL, word_BxL, p: int) -> np.ndarray:
    """The k = round(prob x candidates) tokens (at least 1, at most p) of each row with the
    smallest draws. With whole words, the words in draw order while all their pieces fit in k
    (a word's pieces share its draw, so they sit together in that order)."""
    k_B = np.clip(np.rint(candidate_BxL.sum(1) * self.prob), 1, p)
    order = np.argsort(np.where(candidate_BxL, draw_BxL, np.inf), axis=1, kind="stable")
    cand = np.take_along_axis(candidate_BxL, order, axis=1)
    word = np.take_along_axis(word_BxL, order, axis=1)
    taken = np.cumsum(cand, axis=1)
    # The count at each word's last piece in that order (its own index for single tokens).
    seq = word.shape[1]
    last = np.concatenate([word[:, 1:] != word[:, :-1], np.ones((len(word), 1), bool)], axis=1)
    end = np.minimum.accumulate(np.where(last, np.arange(seq), seq)[:, ::-1], axis=1)[:, ::-1]
    fits = np.take_along_axis(taken, end, axis=1) <= k_B[:, None]
    chosen = np.zeros_like(candidate_BxL)
    np.put_along_axis(chosen, order, cand & fits, axis=1)
    return chosen

  def max_predictions(self, seq_len: int) -> int:
    if self.count == "exact":
      return max(1, int(np.ceil(seq_len * self.prob)))
    return int(np.ceil(seq_len * self.prob * 1.5)) + 4


class PackedIterator:
  """Seeded, resumable batches of next-token windows from one token stream."""

  def __init__(
    self,
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    masker: MaskedLM | None = None,
  ):
    self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
    self.masker = masker
    self.windows = (len(tokens) - seq_len) // seq_len  # the same count for any offset < seq_len
    if self.windows < batch_size:
      raise ValueError(
        f"the corpus has {len(tokens)} tokens: fewer than one batch of {batch_size} x {seq_len + 1}-token windows"
      )
    per = batch_size // process_count
    self.rows = slice(process_index * per, (process_index + 1) * per)
    self.epoch = self.index = 0

  @property
  def steps_per_epoch(self) -> int:
    return self.windows // self.batch_size

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

  def set_state(self, state: dict[str, int]) -> None:
    if state.get("seed", self.seed) != self.seed:
      raise ValueError(f"checkpoint data seed {state['seed']} != config.seed {self.seed}")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])

  def starts(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, epoch])
    offset = int(rng.integers(self.seq_len))
    return offset + self.seq_len * rng.permutation(self.windows)

  def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, int]]]:
    return self

  def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    s = self.starts(self.epoch)[self.index * self.batch_size : (self.index + 1) * self.batch_size]
    win = self.tokens[s[:, None] + np.arange(self.seq_len + 1)[None, :]]
    if self.masker is None:  # next-token prediction
      batch = {"input_ids": win[:, :-1], "labels": win[:, 1:], "weights": np.ones(win[:, 1:].shape, np.float32)}
    else:  # masked LM on the first seq_len tokens; masks drawn for the global batch, then sliced
      ids = win[:, :-1]
      batch = self.masker(ids, np.ones(ids.shape, bool), (self.seed, self.epoch, self.index))
    self.index += 1
    if self.index == self.steps_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    return {k: v[self.rows] for k, v in batch.items()}, self.get_state()


def eval_batches(
  tokens: np.ndarray,
  *,
  seq_len: int,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  masker: MaskedLM | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Consecutive windows: each of tokens[1:] is a target exactly once, with context from its
  window. With `masker`, the windows are masked with a fixed key, the same at every eval."""
  n_targets = len(tokens) - 1
  n_windows = -(-n_targets // seq_len)
  per = batch_size // process_count
  rows = slice(process_index * per, (process_index + 1) * per)
  for first in range(0, n_windows, batch_size):
    ids = np.zeros((batch_size, seq_len), np.int32)
    labels = np.zeros((batch_size, seq_len), np.int32)
    weights = np.zeros((batch_size, seq_len), np.float32)
    for r, w in enumerate(range(first, min(first + batch_size, n_windows))):
      s = w * seq_len
      n = min(seq_len, n_targets - s)
      ids[r, :n], labels[r, :n], weights[r, :n] = tokens[s : s + n], tokens[s + 1 : s + n + 1], 1.0
    if masker is None:
      batch = {"input_ids": ids, "labels": labels, "weights": weights}
    else:
      batch = masker(ids, weights > 0, (0, first))
    yield {k: v[rows] for k, v in batch.items()}

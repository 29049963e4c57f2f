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
      raise ValueError(f"characters not in the vocabulary: {missing[:10]}")
    return [self.index[c] for c in text]

  def decode(self, ids) -> str:
    return "".join(self.chars[i] for i in ids)

  def save(self, folder: str | Path) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / self.FILE).write_text(json.dumps({"chars": self.chars}))

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


def read_text(paths: str) -> str:
  """Comma-separated text files, concatenated. Errors name the missing file."""
  parts = []
  for p in filter(None, (s.strip() for s in paths.split(","))):
    path = Path(p)
    if not path.is_file():
      raise FileNotFoundError(f"config.data.train_files: {path} does not exist")
    parts.append(path.read_text(encoding="utf-8"))
  if not parts:
    raise ValueError("config.data.train_files is empty")
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
  ):
    self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
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
    s = self.starts(self.epoch)[self.index * self.batch_size : (self.index + 1) * self.batch_size][self.rows]
    win = self.tokens[s[:, None] + np.arange(self.seq_len + 1)[None, :]]
    self.index += 1
    if self.index == self.steps_per_epoch:
      self.epoch, self.index = self.epoch + 1, 0
    batch = {"input_ids": win[:, :-1], "labels": win[:, 1:], "weights": np.ones(win[:, 1:].shape, np.float32)}
    return batch, self.get_state()


def eval_batches(
  tokens: np.ndarray, *, seq_len: int, batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
  """Consecutive windows: each of tokens[1:] is a target exactly once, with context from its window."""
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
    yield {"input_ids": ids[rows], "labels": labels[rows], "weights": weights[rows]}

"""Train a tokenizer on text files and save it in Hugging Face format.

    python -m research.tokenizer --kind wordpiece --files ../shared/data/lm/wikitext2/wiki.valid.raw \
        --vocab_size 8000 --out runs/tokenizers/wiki-wp8k
    python -m research.tokenizer --kind bpe --files corpus.txt --vocab_size 8000 --out runs/tokenizers/bpe8k

WordPiece (BERT's: lower-cased, [PAD] [UNK] [CLS] [SEP] [MASK], `[CLS] a [SEP] b [SEP]` pairs)
for MLM encoders; byte-level BPE (GPT-2's, with `<|endoftext|>` between documents) for
decoders. The folder (`tokenizer.json`, plus `vocab.txt` for WordPiece) loads with
`transformers.AutoTokenizer.from_pretrained(folder)` like any hub tokenizer, and is what
`config.data.tokenizer` / `config.model.tokenizer` take.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EOT = "<|endoftext|>"


def _iter_texts(files: list[str]):
  """The non-blank lines of `files`; an error names a missing file, and a corpus with no text."""
  seen = False
  for f in files:
    path = Path(f)
    if not path.is_file():
      raise FileNotFoundError(f"--files: {path} does not exist")
    with path.open(encoding="utf-8-sig") as fh:  # -sig: a leading byte-order mark is not text
      try:
        for line in fh:
          if line.strip():
            seen = True
            yield line
      except UnicodeDecodeError as e:
        raise ValueError(f"--files: {path} is not UTF-8 text ({e.reason})") from None
  if not seen:
    raise ValueError(f"--files={','.join(files)}: no text to train on (every line is blank)")


def train_wordpiece(files: list[str], vocab_size: int, out: str | Path, lowercase: bool = True):
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
  from transformers import BertTokenizerFast

  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS)
  tok.train_from_iterator(_iter_texts(files), trainer=trainer)
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
  )
  fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase)
  fast.save_pretrained(str(out))
  # BERT's plain vocabulary file, one token per line in id order (for tools that read it).
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  (Path(out) / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
  return fast


def train_bpe(files: list[str], vocab_size: int, out: str | Path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(_iter_texts(files), trainer=trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT)
  fast.save_pretrained(str(out))
  return fast


def _define_flags() -> None:
  """Flags exist only when this file is the program (predict.py defines --out too)."""
  flags.DEFINE_enum("kind", "wordpiece", ["wordpiece", "bpe"], "Tokenizer model.")
  flags.DEFINE_list("files", None, "Comma-separated text files.")
  flags.DEFINE_integer("vocab_size", 8000, "Vocabulary size, special tokens included.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_bool("lowercase", True, "WordPiece: lower-case and strip accents (uncased BERT).")
  flags.mark_flags_as_required(["files", "out"])
  flags.register_validator(
    "vocab_size", lambda v: v > len(BERT_SPECIALS), "--vocab_size must exceed the special tokens"
  )


def main(argv):
  del argv
  f = flags.FLAGS
  if f.kind == "wordpiece":
    tok = train_wordpiece(f.files, f.vocab_size, f.out, f.lowercase)
  else:
    tok = train_bpe(f.files, f.vocab_size, f.out)
  print(f"{f.kind}: {len(tok)} tokens -> {f.out}")
  if len(tok) < f.vocab_size:
    print(f"note: {len(tok)} tokens, fewer than --vocab_size={f.vocab_size}: the corpus holds no more", file=sys.stderr)


if __name__ == "__main__":
  _define_flags()
  app.run(main)

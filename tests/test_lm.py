"""Causal LM: the model's causality, KV-cached generation == uncached, sampling filters,
the packed corpus pipeline, and a pretraining run that resumes exactly."""

import json
import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO

from configs import common, pretrain_lm
from research import generate, train
from research.data import lm
from research.models.gpt import GPT, GPTConfig

CFG = GPTConfig(vocab_size=17, block_size=24, num_layers=2, num_heads=2, hidden_size=16)


def _model(positions="learned"):
  cfg = GPTConfig(**(CFG.to_dict() | {"positions": positions}))
  model = GPT(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  # Random init gives near-uniform logits; sharpen so greedy choices are well separated.
  params = jax.tree.map(lambda x: x * 3.0, params)
  return model, params


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_causal_mask_hides_the_future(positions):
  model, params = _model(positions)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 17, (2, 12)), jnp.int32)
  changed = ids.at[:, 8:].set((ids[:, 8:] + 1) % 17)
  a, b = model.apply({"params": params}, ids), model.apply({"params": params}, changed)
  np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-5)
  assert np.abs(np.asarray(a[:, 8:] - b[:, 8:])).max() > 1e-3


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_kv_cache_generation_equals_uncached(positions):
  model, params = _model(positions)
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, 17, (3, 5)), jnp.int32)
  kw = dict(model=model, max_new_tokens=12)
  for sampling in (dict(temperature=0.0), dict(temperature=0.9, top_k=5, top_p=0.9)):
    t1, l1 = generate.generate(params, prompt, jax.random.key(0), use_cache=True, **kw, **sampling)
    t2, l2 = generate.generate(params, prompt, jax.random.key(0), use_cache=False, **kw, **sampling)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_allclose(l1, l2, atol=1e-4)
  # Greedy picks the argmax of the full forward pass at every position.
  toks, _ = generate.generate(params, prompt, jax.random.key(0), temperature=0.0, **kw)
  full = model.apply({"params": params}, jnp.concatenate([prompt, toks], axis=1))
  np.testing.assert_array_equal(full[:, 4:-1].argmax(-1), toks)


def test_sampling_filters_and_seeds():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda f: np.isfinite(np.asarray(f)) & (np.asarray(f) > -1e30)  # noqa: E731
  assert kept(generate.filter_logits(logits, temperature=1.0, top_k=2, top_p=1.0)).tolist() == [[1, 1, 0, 0]]
  assert kept(generate.filter_logits(logits, temperature=1.0, top_k=0, top_p=0.7)).tolist() == [[1, 1, 0, 0]]
  assert kept(generate.filter_logits(logits, temperature=1.0, top_k=0, top_p=0.81)).tolist() == [[1, 1, 1, 0]]
  assert kept(generate.filter_logits(logits, temperature=1.0, top_k=0, top_p=0.01)).tolist() == [[1, 0, 0, 0]]
  model, params = _model()
  prompt = jnp.zeros((2, 3), jnp.int32)
  kw = dict(model=model, max_new_tokens=10, temperature=1.0)
  a = generate.generate(params, prompt, jax.random.key(1), **kw)[0]
  b = generate.generate(params, prompt, jax.random.key(1), **kw)[0]
  c = generate.generate(params, prompt, jax.random.key(2), **kw)[0]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  long = generate.generate_long(params, prompt, jax.random.key(0), model=model, max_new_tokens=50, temperature=0.0)
  assert long.shape == (2, 50)  # longer than block_size 24: the window slides


def test_packed_iterator_is_seeded_resumable_and_eval_covers_every_token():
  tokens = np.arange(1000, dtype=np.int32)
  it = lm.PackedIterator(tokens, seq_len=16, batch_size=4, seed=3)
  first = [next(it)[0] for _ in range(20)]  # crosses an epoch boundary (15 steps/epoch)
  assert it.steps_per_epoch == 15
  for b in first:
    np.testing.assert_array_equal(b["labels"], b["input_ids"] + 1)  # next-token targets, no padding
  it2 = lm.PackedIterator(tokens, seq_len=16, batch_size=4, seed=3)
  for _ in range(7):
    _, state = next(it2)
  it3 = lm.PackedIterator(tokens, seq_len=16, batch_size=4, seed=3)
  it3.set_state(json.loads(json.dumps(state)))
  for b in first[7:]:
    np.testing.assert_array_equal(next(it3)[0]["input_ids"], b["input_ids"])
  # Eval: every token after the first is a target exactly once; padding has weight 0.
  seen = np.concatenate(
    [b["labels"][b["weights"] > 0] for b in lm.eval_batches(tokens[:101], seq_len=16, batch_size=4)]
  )
  np.testing.assert_array_equal(np.sort(seen), np.arange(1, 101))


def test_documents_end_with_a_separator(tokenizer):
  ids = lm.tokenize_stream("first line\n\nsecond line\n", tokenizer, "lines")
  assert (ids == tokenizer.sep_token_id).sum() == 2 and ids[-1] == tokenizer.sep_token_id
  with pytest.raises(FileNotFoundError, match="no_such.txt does not exist"):
    lm.read_text("/tmp/no_such.txt")


def _lm_config(tmp_path, **overrides):
  text = tmp_path / "corpus.txt"
  if not text.exists():
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
  c = pretrain_lm.get_config("model=tiny,smoke")
  c.unlock()
  c.data.train_files = str(text)
  c.data.seq_len = c.model.block_size = 32
  c.batch_size, c.eval_batch_size = 8, 16
  c.num_train_steps, c.eval_every_steps, c.checkpoint_every_steps, c.log_every_steps = 12, 6, 3, 3
  c.progress = False
  common.set_fields(c, overrides)
  c.lock()
  return c


def test_corpus_byte_order_mark_and_crlf_are_not_text(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfto be,\r\nor not\r\n")
  (tmp_path / "b.txt").write_bytes(b"to be,\nor not\n")
  assert lm.read_text(f"{tmp_path / 'a.txt'}") == lm.read_text(f"{tmp_path / 'b.txt'}") == "to be,\nor not\n"


def test_bad_corpora_give_errors_that_name_the_files(tmp_path):
  """A corpus too small for one batch, an empty validation split and a file that is not UTF-8
  are refused naming the config key and the file; a character that only the validation text
  holds gets an id (the char vocabulary covers the whole corpus, as nanoGPT's)."""
  tiny = tmp_path / "tiny.txt"
  tiny.write_text("hi\n")
  with pytest.raises(ValueError, match=r"config.data.train_files=.*tiny.txt: the corpus has \d+ tokens"):
    train.train_and_evaluate(_lm_config(tmp_path, **{"data.train_files": str(tiny)}), tmp_path / "a")
  with pytest.raises(ValueError, match=r"the last config.data.val_fraction=0.0 .*: 0 validation tokens"):
    train.train_and_evaluate(_lm_config(tmp_path, **{"data.val_fraction": 0.0}), tmp_path / "b")
  with pytest.raises(ValueError, match=r"config.data.seq_len=0, val_fraction=0.1: expected"):  # was a ZeroDivisionError
    train.train_and_evaluate(_lm_config(tmp_path, **{"data.seq_len": 0}), tmp_path / "b2")
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"caf\xe9\n" * 10)
  with pytest.raises(ValueError, match=r"config.data.val_files: .*binary.txt is not UTF-8 text"):
    train.train_and_evaluate(_lm_config(tmp_path, **{"data.val_files": str(binary)}), tmp_path / "c")
  val = tmp_path / "val.txt"
  val.write_text("line 7: the quick brown fox jumps over the lazy dog!\n")  # "!" is not in the training text
  c = _lm_config(tmp_path, **{"data.val_files": str(val), "num_train_steps": 1, "eval_every_steps": 1})
  assert np.isfinite(train.train_and_evaluate(c, tmp_path / "d")["final"]["loss"])
  assert "!" in lm.CharTokenizer.load(tmp_path / "d" / "tokenizer").chars


def test_pretraining_learns_resumes_exactly_and_samples(tmp_path):
  from research import checkpoint

  straight = train.train_and_evaluate(_lm_config(tmp_path), tmp_path / "straight")
  assert straight["final"]["loss"] < np.log(len(lm.CharTokenizer.load(tmp_path / "straight" / "tokenizer")))
  assert straight["final"]["perplexity"] == pytest.approx(np.exp(straight["final"]["loss"]), rel=1e-6)
  # Stop at step 6 (as if killed after its checkpoint), then rerun to 12.
  train.train_and_evaluate(_lm_config(tmp_path, num_train_steps=6), tmp_path / "resumed")
  resumed = train.train_and_evaluate(_lm_config(tmp_path), tmp_path / "resumed")
  assert resumed["final"]["loss"] == straight["final"]["loss"]
  a = checkpoint.restore_on_host(tmp_path / "straight" / "checkpoints")[1]["params"]
  b = checkpoint.restore_on_host(tmp_path / "resumed" / "checkpoints")[1]["params"]
  jax.tree.map(np.testing.assert_array_equal, a, b)
  model, params, tok, step = generate.load(tmp_path / "straight")
  out = generate.generate_long(
    params,
    np.asarray([tok.encode("line")]),
    jax.random.key(0),
    model=model,
    max_new_tokens=40,
    temperature=0.8,
    top_k=5,
  )
  assert step == 12 and len(tok.decode(out[0].tolist())) == 40
  # Misuses of the run get errors that say what to do instead.
  from research import predict

  with pytest.raises(ValueError, match=r"is a 'lm' pretraining run: sample from it with python -m research.generate"):
    predict.Predictor(tmp_path / "straight")
  with pytest.raises(FileNotFoundError, match=r"not a training workdir"):
    generate.load(tmp_path / "no_run")
  for args, message in (
    (["--prompt="], "--prompt='' encodes to no tokens"),
    (["--top_p=1.5"], "--top_p must be in (0, 1]"),
  ):
    cmd = [
      sys.executable,
      "-m",
      "research.generate",
      f"--workdir={tmp_path / 'straight'}",
      "--executable_cache=",
      *args,
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


def test_trained_tokenizers_load_in_transformers(tmp_path):
  import transformers

  from research import tokenizer

  text = tmp_path / "t.txt"
  text.write_text("".join(f"The quick brown fox {i} jumps over the lazy dog.\n" for i in range(200)))
  tokenizer.train_wordpiece([str(text)], 200, tmp_path / "wp")
  wp = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "wp"))
  ids = wp("the quick fox", "lazy dog")["input_ids"]
  assert ids[0] == wp.cls_token_id and ids.count(wp.sep_token_id) == 2 and wp.mask_token_id is not None
  assert wp.decode(wp("the quick fox")["input_ids"], skip_special_tokens=True) == "the quick fox"
  vocab = (tmp_path / "wp" / "vocab.txt").read_text().splitlines()
  assert vocab[:5] == tokenizer.BERT_SPECIALS and len(vocab) == len(wp)
  tokenizer.train_bpe([str(text)], 300, tmp_path / "bpe")
  bpe = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bpe"))
  assert bpe.decode(bpe("The quick brown fox")["input_ids"]) == "The quick brown fox"
  assert bpe.eos_token == tokenizer.EOT
  blank = tmp_path / "blank.txt"
  blank.write_text("\n  \n")
  with pytest.raises(ValueError, match=r"blank.txt: no text to train on"):  # was a vocabulary of the 5 specials
    tokenizer.train_wordpiece([str(blank)], 200, tmp_path / "none")
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"caf\xe9\n" * 10)
  with pytest.raises(ValueError, match=r"--files: .*binary.txt is not UTF-8 text"):  # was a bare UnicodeDecodeError
    tokenizer.train_wordpiece([str(binary)], 200, tmp_path / "none")
  assert not (tmp_path / "none").exists()


def test_mlm_export_loads_in_pytorch_with_same_logits(tmp_path):
  """Our BertForMaskedLM export, loaded by transformers' PyTorch `BertForMaskedLM`
  (tests/fixtures/make_mlm_golden.py), gives our logits and predicts the same tokens."""
  import make_mlm_golden as g
  from conftest import REPO

  from research.models import convert

  model, cfg, params = g.build_params()
  ids, mask, types = g.inputs()
  ours = np.asarray(model.apply({"params": params}, ids, mask, types))
  golden = np.load(REPO / "tests" / "fixtures" / "mlm_golden.npz")["logits"]
  real = mask.astype(bool)
  assert np.abs(ours - golden)[real].max() <= 1e-4
  np.testing.assert_array_equal(ours.argmax(-1)[real], golden.argmax(-1)[real])
  # Export and load back: the same tree, bit-exact (the pooler, absent from BertForMaskedLM, aside).
  folder = convert.save_hf_mlm_folder(tmp_path / "mlm", params, cfg)
  _, loaded = convert.load_hf_mlm_folder(str(folder))
  loaded["bert"]["pooler"] = params["bert"]["pooler"]
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))


def test_export_into_a_used_folder_names_what_it_kept(tmp_path, caplog):
  """Files the export does not write stay, as with `save_pretrained`, and are named (a PEFT
  `adapter_config.json` left there would make transformers load an adapter)."""
  import make_mlm_golden as g

  from research.models import convert

  model, cfg, params = g.build_params()
  (tmp_path / "adapter_config.json").write_text("{}")
  (tmp_path / "config.json").write_text("{}")  # overwritten, so not named
  with caplog.at_level(logging.WARNING, logger="research.models.convert"):
    convert.save_hf_mlm_folder(tmp_path, params, cfg)
  assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
    "the export kept files from before that it did not write: adapter_config.json"
  ]
  caplog.clear()
  convert.save_hf_mlm_folder(tmp_path / "fresh", params, cfg)
  assert not caplog.records


def test_masking_rule_and_masked_lm_pretraining(tmp_path, tokenizer):
  masker = lm.MaskedLM(tokenizer, prob=0.15)
  ids = np.asarray(tokenizer(["the quick brown fox jumps over the lazy dog " * 20] * 64)["input_ids"])[:, :128]
  batch = masker(ids, np.ones(ids.shape, bool), (0, 0, 0))
  b2 = masker(ids, np.ones(ids.shape, bool), (0, 0, 0))
  jax.tree.map(np.testing.assert_array_equal, batch, b2)  # a pure function of the key
  chosen = batch["weights"] > 0
  pos = batch["masked_positions"]
  picked = np.take_along_axis(batch["input_ids"], pos, axis=1)[chosen]
  original = np.take_along_axis(ids, pos, axis=1)[chosen]
  np.testing.assert_array_equal(batch["labels"][chosen], original)
  assert 0.13 < chosen.sum() / (ids.shape[0] * (ids.shape[1] - 2)) < 0.17  # [CLS]/[SEP] are never chosen
  frac_mask = (picked == tokenizer.mask_token_id).mean()
  frac_same = (picked == original).mean()
  assert 0.75 < frac_mask < 0.85 and 0.07 < frac_same < 0.16
  assert not np.isin(original, tokenizer.all_special_ids).any()
  # Whole-word: a word's "##" pieces are masked with its first piece.
  ww = lm.MaskedLM(tokenizer, prob=0.3, whole_word=True)
  words = np.asarray(tokenizer(["unbelievably tokenization embeddings " * 30] * 8)["input_ids"])[:, :96]
  wb = ww(words, np.ones(words.shape, bool), (1,))
  full = np.zeros(words.shape, bool)
  np.put_along_axis(full, wb["masked_positions"], wb["weights"] > 0, axis=1)
  cont = np.vectorize(lambda i: tokenizer.convert_ids_to_tokens(int(i)).startswith("##"))(words)
  prev_chosen = np.concatenate([np.zeros((8, 1), bool), full[:, :-1]], axis=1)
  assert full.any() and (full[cont] == prev_chosen[cont]).all()


def test_exact_count_masking(tokenizer):
  """data.mask_count=exact: round(15%) of each row's candidates, whole words kept whole."""
  ids = np.asarray(tokenizer(["unbelievably the tokenization of embeddings went fine " * 20] * 16)["input_ids"])[
    :, :128
  ]
  valid = np.ones(ids.shape, bool)
  valid[3, 100:] = False  # a padded row: fewer candidates, fewer predictions
  candidates = (valid & ~np.isin(ids, tokenizer.all_special_ids)).sum(1)
  for whole_word in (False, True):
    masker = lm.MaskedLM(tokenizer, prob=0.15, whole_word=whole_word, count="exact")
    assert masker.max_predictions(128) == 20
    batch = masker(ids, valid, (2,))
    jax.tree.map(np.testing.assert_array_equal, batch, masker(ids, valid, (2,)))
    assert batch["masked_positions"].shape == (16, 20)
    n = batch["weights"].sum(1)
    k = np.rint(candidates * 0.15)
    if whole_word:  # the first word that would overflow k ends the row's choice
      longest = len(tokenizer.tokenize("unbelievably"))
      assert ((n <= k) & (n > k - longest)).all()
      full = np.zeros(ids.shape, bool)
      np.put_along_axis(full, batch["masked_positions"], batch["weights"] > 0, axis=1)
      cont = np.vectorize(lambda i: tokenizer.convert_ids_to_tokens(int(i)).startswith("##"))(ids)
      prev = np.concatenate([np.zeros((16, 1), bool), full[:, :-1]], axis=1)
      assert (full[cont] == prev[cont]).all()
    else:
      np.testing.assert_array_equal(n, k)
    chosen = batch["weights"] > 0
    assert valid[np.arange(16)[:, None].repeat(20, 1)[chosen], batch["masked_positions"][chosen]].all()
    np.testing.assert_array_equal(
      np.take_along_axis(ids, batch["masked_positions"], axis=1)[chosen], batch["labels"][chosen]
    )
  with pytest.raises(ValueError, match="mask_count='uniform'"):
    lm.MaskedLM(tokenizer, count="uniform")
  for prob in (0.0, 1.5):  # 0 trained on nothing and reported a loss of 0
    with pytest.raises(ValueError, match=rf"config.data.mask_prob={prob}: expected 0 < mask_prob < 1"):
      lm.MaskedLM(tokenizer, prob=prob)


def test_mlm_run_exports_and_fine_tunes(tmp_path, small_glue, caplog):
  from conftest import tiny_config

  from research import predict

  corpus = tmp_path / "corpus.txt"
  corpus.write_text("".join(f"sentence {i} is about a film that was good or bad.\n" for i in range(400)))
  c = pretrain_mlm_config(corpus)
  result = train.train_and_evaluate(c, tmp_path / "mlm")
  assert result["step"] == 8 and result["final"]["accuracy"] >= 0 and np.isfinite(result["final"]["loss"])
  out = predict.export_mlm(tmp_path / "mlm", tmp_path / "mlm_hf")
  assert (out / "tokenizer.json").exists()
  ft = tiny_config(small_glue, **{"model.init_from": str(out), "model.tokenizer": ""})
  assert train.train_and_evaluate(ft, tmp_path / "ft")["step"] == 8
  # Continued masked-LM pretraining (model.init_from): a BertForMaskedLM folder loads whole; a
  # folder without an MLM head (here the fine-tuned classifier, exported) loads its encoder, and
  # the head starts fresh.
  from research.models import build, convert

  p = predict.Predictor(tmp_path / "ft", step="latest")
  cls_hf = convert.save_hf_folder(tmp_path / "ft_hf", p.params, p.bert_cfg, num_labels=2, tokenizer=p.tokenizer)
  _, exported = convert.load_hf_mlm_folder(str(out))
  for folder, head in ((out, True), (cls_hf, False)):
    mc = ml_collections.ConfigDict(c.model.to_dict() | {"init_from": str(folder)})
    caplog.clear()
    with caplog.at_level(logging.INFO):
      _, params, arch = build.build_model(mc, 2, p.bert_cfg.vocab_size, jax.random.PRNGKey(3))
    # The head it loads is not reported as ignored tensors.
    assert head == ("masked-LM head loaded" in caplog.text) and "ignored" not in caplog.text
    assert arch["arch"] == "bert_mlm" and arch["vocab_size"] == p.bert_cfg.vocab_size
    want_embed = (exported if head else p.params)["bert"]["token_embed"]["embedding"]
    np.testing.assert_array_equal(params["bert"]["token_embed"]["embedding"], want_embed)
    if head:
      np.testing.assert_array_equal(params["mlm_dense"]["kernel"], exported["mlm_dense"]["kernel"])
    else:
      assert not np.asarray(params["mlm_bias"]).any() and np.asarray(params["mlm_norm"]["scale"]).all()
  cont = pretrain_mlm_config(corpus)
  cont.unlock()
  cont.model.init_from = str(cls_hf)
  assert np.isfinite(train.train_and_evaluate(cont, tmp_path / "continued")["final"]["loss"])


def pretrain_mlm_config(corpus):
  from configs import pretrain_mlm

  c = pretrain_mlm.get_config("model=tiny,smoke")
  c.unlock()
  c.data.train_files = c.data.val_files = str(corpus)
  c.data.seq_len, c.model.max_position_embeddings = 32, 64
  c.batch_size, c.eval_batch_size = 8, 16
  c.num_train_steps, c.eval_every_steps, c.checkpoint_every_steps, c.log_every_steps = 8, 4, 4, 4
  c.progress = False
  c.lock()
  return c

"""Causal LM: the model's causality, KV-cached generation == uncached, sampling filters,
the packed corpus pipeline, and a pretraining run that resumes exactly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain_lm
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
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  c.lock()
  return c


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

"""Our Flax BERT against transformers' PyTorch BertModel, and the strict weight converter."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import common
from research.models import build, convert, dropout
from research.models.bert import BertClassifier, BertConfig, BertEncoder, mean_pool

GOLDEN = "tests/fixtures/minilm_golden.npz"  # made by tests/fixtures/make_bert_golden.py


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  cfg, encoder, heads, ignored = convert.load_hf_folder(str(minilm_dir))
  return cfg, encoder


def _encode(cfg, encoder, ids, mask, types):
  return BertEncoder(cfg).apply({"params": encoder}, ids, mask, types, train=False)


@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_parity_with_pytorch_golden(minilm, attention):
  cfg, encoder = minilm
  cfg = dataclasses.replace(cfg, attention=attention)  # xla: jax.nn.dot_product_attention
  from conftest import REPO

  g = np.load(REPO / GOLDEN)
  assert g["attention_mask"].min() == 0, "the fixture must contain padding"
  hidden, pooled = _encode(cfg, encoder, g["input_ids"], g["attention_mask"], g["token_type_ids"])
  real = g["attention_mask"].astype(bool)
  # Padded positions are don't-cares (no real token attends to them), so compare real tokens.
  assert np.abs(np.asarray(hidden) - g["last_hidden_state"])[real].max() <= 1e-5
  assert np.abs(np.asarray(pooled) - g["pooler_output"]).max() <= 1e-5


def test_padding_does_not_change_real_tokens(minilm, tokenizer):
  cfg, encoder = minilm
  alone = tokenizer(["A man is playing a guitar."], return_tensors="np")
  padded = tokenizer(["A man is playing a guitar.", "a much longer sentence " * 5], padding=True, return_tensors="np")
  n = alone["input_ids"].shape[1]
  h1, _ = _encode(cfg, encoder, alone["input_ids"], alone["attention_mask"], alone["token_type_ids"])
  h2, _ = _encode(cfg, encoder, padded["input_ids"], padded["attention_mask"], padded["token_type_ids"])
  np.testing.assert_allclose(np.asarray(h1[0]), np.asarray(h2[0, :n]), atol=1e-5)


def test_paraphrases_closer_than_unrelated(minilm, tokenizer):
  """Mean-pooled MiniLM embeddings (what the checkpoint was trained for) rank meaning."""
  cfg, encoder = minilm
  pairs = [
    ("A man is playing a guitar.", "Someone is playing an instrument.", "The stock market fell sharply today."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", "Interest rates were raised again."),
    ("How do I bake bread?", "What is a recipe for making bread?", "The train leaves at noon."),
  ]
  texts = [t for p in pairs for t in p]
  enc = tokenizer(texts, padding=True, return_tensors="np")
  hidden, _ = _encode(cfg, encoder, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
  emb = mean_pool(hidden, jnp.asarray(enc["attention_mask"]))
  emb = np.asarray(emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)).reshape(len(pairs), 3, -1)
  para = (emb[:, 0] * emb[:, 1]).sum(-1)
  unrelated = (emb[:, 0] * emb[:, 2]).sum(-1)
  assert (para > unrelated + 0.2).all(), (para, unrelated)


def _copy_model(minilm_dir, tmp_path):
  dst = tmp_path / "model"
  dst.mkdir()
  for f in ("config.json", "model.safetensors"):
    shutil.copy(minilm_dir / f, dst / f)
  return dst


def test_missing_unexpected_and_misshaped_keys_are_named(minilm_dir, tmp_path):
  folder = _copy_model(minilm_dir, tmp_path)
  t = load_file(str(folder / "model.safetensors"))
  del t["encoder.layer.3.attention.self.key.weight"]
  t["encoder.layer.0.output.dense.bias"] = np.zeros((7,), np.float32)
  t["encoder.extra.weight"] = np.zeros((2,), np.float32)
  save_file(t, str(folder / "model.safetensors"))
  with pytest.raises(convert.WeightsError) as e:
    convert.load_hf_folder(str(folder))
  msg = str(e.value)
  assert "missing: encoder.layer.3.attention.self.key.weight" in msg
  assert "unexpected: encoder.extra.weight" in msg
  assert "encoder.layer.0.output.dense.bias: (7,) != expected (384,)" in msg


def test_wrong_architecture_folder(minilm_dir, tmp_path):
  folder = _copy_model(minilm_dir, tmp_path)
  cfg = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(convert.WeightsError, match=r"config.json: model_type is 'gpt2'"):
    convert.load_hf_folder(str(folder))


def test_layer_count_mismatch_is_reported(minilm_dir, tmp_path):
  folder = _copy_model(minilm_dir, tmp_path)
  cfg = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 4}))
  with pytest.raises(convert.WeightsError, match=r"unexpected: .*encoder\.layer\.4\."):
    convert.load_hf_folder(str(folder))


def test_no_weights_file_and_no_pickles(tmp_path, minilm_dir):
  folder = tmp_path / "m"
  folder.mkdir()
  shutil.copy(minilm_dir / "config.json", folder / "config.json")
  (folder / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(convert.WeightsError, match="pickled pytorch_model.bin is not loaded"):
    convert.load_hf_folder(str(folder))


def test_export_round_trip(minilm_dir, tmp_path):
  """Exported names, shapes and values load back (and are HF's own names)."""
  cfg, encoder, heads, _ = convert.load_hf_folder(str(minilm_dir))
  model = BertClassifier(cfg, num_labels=3)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.PRNGKey(1), ids, ids, ids)["params"]
  params = convert.merge_pretrained(params, encoder, heads, 3)
  out = convert.save_hf_folder(tmp_path / "export", params, cfg, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
  tensors = load_file(str(out / "model.safetensors"))
  original = load_file(str(minilm_dir / "model.safetensors"))
  for k, v in original.items():
    if k != "embeddings.position_ids":
      np.testing.assert_array_equal(tensors["bert." + k], v)
  cfg2, enc2, heads2, _ = convert.load_hf_folder(str(out))
  assert cfg2 == cfg
  params2 = convert.merge_pretrained(model.init(jax.random.PRNGKey(2), ids, ids, ids)["params"], enc2, heads2, 3)
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_flax_msgpack_folder_loads(minilm_dir, tmp_path):
  """HF Flax checkpoints (kernel/scale/embedding leaves, (in, out) kernels) map the same."""
  import flax

  cfg, encoder, _, _ = convert.load_hf_folder(str(minilm_dir))
  t = load_file(str(minilm_dir / "model.safetensors"))
  tree = {}
  for k, v in t.items():
    if k == "embeddings.position_ids":
      continue
    *mods, leaf = k.split(".")
    if "LayerNorm" in mods[-1]:
      leaf = {"weight": "scale"}.get(leaf, leaf)
    elif "embeddings" in mods[-1]:
      leaf = "embedding"
    elif leaf == "weight":
      leaf, v = "kernel", v.T
    tree[tuple(mods) + (leaf,)] = v
  folder = tmp_path / "flax"
  folder.mkdir()
  shutil.copy(minilm_dir / "config.json", folder / "config.json")
  (folder / "flax_model.msgpack").write_bytes(
    flax.serialization.msgpack_serialize(flax.traverse_util.unflatten_dict(tree))
  )
  _, enc2, _, _ = convert.load_hf_folder(str(folder))
  jax.tree.map(np.testing.assert_array_equal, enc2, encoder)


def test_dropout_is_driven_by_the_rng():
  cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
  model = BertClassifier(cfg, num_labels=2)
  ids = jnp.ones((2, 5), jnp.int32)
  mask = jnp.ones((2, 5), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), ids, mask, mask * 0)["params"]

  def run(seed, train=True):
    return model.apply({"params": params}, ids, mask, mask * 0, train=train, rngs={"dropout": jax.random.PRNGKey(seed)})

  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))
  np.testing.assert_array_equal(run(1, train=False), run(2, train=False))


@pytest.mark.parametrize("bits", ["jax", "hash"])
@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("shape", [(64, 12, 128), (4001, 7)])  # even and odd last axis
def test_dropout_drops_at_the_rate_and_is_unbiased(impl, shape, bits):
  x = jnp.ones(shape)
  key = jax.random.key(3, impl=impl)
  y = np.asarray(dropout.dropout(x, 0.1, key, bits))
  kept = y != 0
  n = kept.size
  # 16-bit draws: the rate is round(0.1 * 2^16) / 2^16; within 5 binomial std of it.
  rate = round(0.1 * 65536) / 65536
  assert abs((1 - kept.mean()) - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(y[kept], 65536 / (65536 - 6554), rtol=1e-6)  # kept ones scaled by 1 / keep prob
  assert abs(y.mean() - 1.0) < 5 * np.sqrt(rate / (1 - rate) / n)  # unbiased
  # Both halves of each 32-bit word are used: no two positions share a decision pattern.
  assert 0.05 < (1 - kept[..., : shape[-1] // 2].mean()) < 0.15
  assert 0.05 < (1 - kept[..., shape[-1] // 2 :].mean()) < 0.15
  assert not np.array_equal(kept[..., : shape[-1] // 2], kept[..., shape[-1] // 2 : 2 * (shape[-1] // 2)])
  np.testing.assert_array_equal(dropout.dropout(x, 0.1, key, bits), y)  # a function of the key
  assert not np.array_equal(dropout.dropout(x, 0.1, jax.random.key(4, impl=impl), bits), y)
  np.testing.assert_array_equal(dropout.dropout(x, 0.0, key, bits), x)
  np.testing.assert_array_equal(dropout.dropout(x, 1.0, key, bits), 0 * x)


def _corr(a, b):
  return float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])


def test_hash_dropout_draws_are_uniform_and_independent():
  """The "hash" draws: uniform over 2^16 levels, and no correlation between neighbouring
  elements (along any axis), between consecutive steps' keys or between two seeds; each within
  5 standard errors of 0 (a correlation's is ~1/sqrt(n))."""
  key = jax.random.key(0)
  shape = (32, 12, 64, 64)  # an attention-probability mask
  draws = np.asarray(dropout._hash_draws(jax.random.fold_in(key, 7), shape))
  assert draws.min() >= 0 and draws.max() < 65536
  counts = np.bincount(draws.reshape(-1) >> 12, minlength=16)  # 16 equal bins
  expected = draws.size / 16
  assert ((counts - expected) ** 2 / expected).sum() < 50  # chi-square, 15 dof: p ~ 1e-5
  d = (draws >= 6554).astype(np.float64)  # the keep decisions at rate 0.1
  tol = 5 / np.sqrt(d.size / 2)
  for axis in range(4):
    n = shape[axis]
    assert abs(_corr(d.take(range(n - 1), axis), d.take(range(1, n), axis))) < tol, axis
  for other in (jax.random.fold_in(key, 8), jax.random.fold_in(jax.random.key(1), 7)):
    e = (np.asarray(dropout._hash_draws(other, shape)) >= 6554).astype(np.float64)
    assert abs(_corr(d, e)) < 5 / np.sqrt(d.size)
  with pytest.raises(ValueError, match="bits='fast': expected one of jax, hash"):
    dropout.dropout(jnp.ones(4), 0.1, key, "fast")
  mc = common.model_config("tiny")
  mc.dropout_bits = "fast"
  with pytest.raises(ValueError, match="config.model.dropout_bits='fast': expected one of jax, hash"):
    build.build_model(mc, 2, 100, key)


def test_hash_dropout_is_the_same_however_the_array_is_sharded():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jnp.arange(16 * 4 * 6, dtype=jnp.float32).reshape(16, 4, 6) + 1
  key = jax.random.key(5)
  f = jax.jit(lambda x, k: dropout.dropout(x, 0.3, k, "hash"))
  whole = f(x, key)
  sharded = f(jax.device_put(x, jax.NamedSharding(mesh, jax.P("data"))), key)
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(whole))
  assert 0.2 < float((np.asarray(whole) == 0).mean()) < 0.4


def test_export_loads_in_pytorch_with_same_logits(tmp_path):
  """Our exported folder, loaded by transformers' PyTorch BertForSequenceClassification
  (tests/fixtures/make_export_golden.py), gives our logits."""
  import make_export_golden as g
  from conftest import REPO

  model, cfg, params = g.build_params()
  ids, mask, types = g.inputs()
  ours = np.asarray(model.apply({"params": params}, ids, mask, types))
  torch_logits = np.load(REPO / "tests" / "fixtures" / "export_golden.npz")["logits"]
  assert np.abs(ours - torch_logits).max() <= 1e-4
  # The fixture's weights are these: the export of the same seeded params loads back bit-exact.
  folder = convert.save_hf_folder(tmp_path / "e", params, cfg, num_labels=g.NUM_LABELS)
  _, enc, heads, _ = convert.load_hf_folder(str(folder))
  jax.tree.map(np.testing.assert_array_equal, convert.merge_pretrained(params, enc, heads, g.NUM_LABELS), params)


def test_mean_pooling_head_reads_the_mean_of_real_tokens():
  cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
  ids = jnp.array([[5, 6, 7, 0], [8, 9, 0, 0]], jnp.int32)
  mask = (ids > 0).astype(jnp.int32)
  cls_model = BertClassifier(cfg, num_labels=2)
  mean_model = BertClassifier(cfg, num_labels=2, pooling="mean")
  params = cls_model.init(jax.random.PRNGKey(0), ids, mask, mask * 0)["params"]
  hidden, _ = BertEncoder(cfg).apply({"params": params["bert"]}, ids, mask, mask * 0, train=False)
  want = mean_pool(hidden, mask) @ params["classifier"]["kernel"] + params["classifier"]["bias"][None, :]
  got = mean_model.apply({"params": params}, ids, mask, mask * 0)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert not np.allclose(got, cls_model.apply({"params": params}, ids, mask, mask * 0))


def test_erf_gelu_is_the_exact_gelu():
  """bert.gelu (PyTorch's erf form, fast on XLA:CPU) is jax.nn.gelu(approximate=False) (erfc)."""
  from research.models.bert import gelu

  x = jnp.linspace(-12.0, 12.0, 4001)
  np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
  grad = jax.vmap(jax.grad(gelu))(x)
  np.testing.assert_allclose(grad, jax.vmap(jax.grad(lambda y: jax.nn.gelu(y, approximate=False)))(x), atol=1e-6)


def _dense_grads(module):
  """jit(grad) of a scalar function of `module`'s output, with respect to its parameters and input."""
  return jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.tanh(module.apply(p, x).astype(jnp.float32)) ** 2), (0, 1)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_is_nn_dense(dtype):
  """`Dense` has nn.Dense's parameters (the same init from the same key), outputs and gradients."""
  import flax.linen as nn

  from research.models.dense import Dense

  x = jax.random.normal(jax.random.key(1), (4, 8, 16))
  ours, theirs = Dense(24, dtype=dtype), nn.Dense(24, dtype=dtype)
  params = ours.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, params, theirs.init(jax.random.key(0), x))
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours.apply(params, x[0]), theirs.apply(params, x[0]), rtol=1e-6, atol=1e-6)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: the sums round in another order
  got, want = _dense_grads(ours)(params, x), _dense_grads(theirs)(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert float(jnp.abs(g - w).max()) <= tol * float(jnp.abs(w).max())


def test_dense_weight_gradient_takes_no_transposed_copy():
  """The reason `Dense` exists: nn.Dense's B x L x I contraction makes XLA:CPU copy the output
  gradient transposed for the weight gradient; the flattened matmul moves no data at all."""
  import flax.linen as nn

  from research.models.dense import Dense

  x = jax.ShapeDtypeStruct((32, 128, 384), jnp.float32)

  def moves(module):  # the optimized program's copies and transposes
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    text = _dense_grads(module).lower(params, x).compile().as_text()
    return [ln for ln in text.splitlines() if " copy(" in ln or " transpose(" in ln]

  assert moves(Dense(1536)) == []
  assert moves(nn.Dense(1536)), "nn.Dense no longer copies: `Dense` may be unneeded"


@pytest.mark.parametrize("i,o", [(48, 32), (32, 48)])  # dw through g^T (I > O) / through x^T
def test_bf16_matmul_multiplies_bf16_operands_into_fp32_forward_and_backward(i, o):
  from research.models.bf16 import bf16_matmul

  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x, k, g = jax.random.normal(kx, (64, i)), jax.random.normal(kk, (i, o)), jax.random.normal(kg, (64, o))
  r = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731  (bf16 rounding)
  hi = jax.lax.Precision.HIGHEST
  y, vjp = jax.vjp(jax.jit(bf16_matmul), x, k)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, jnp.dot(r(x), r(k), precision=hi), rtol=1e-5, atol=1e-5)
  dx, dk = vjp(g)
  assert dx.dtype == dk.dtype == jnp.float32
  np.testing.assert_allclose(dx, jnp.dot(r(g), r(k).T, precision=hi), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, jnp.dot(r(x).T, r(g), precision=hi), rtol=1e-5, atol=1e-4)
  # and within bf16's rounding of the fp32 product and its gradients
  _, vjp32 = jax.vjp(lambda a, b: jnp.dot(a, b, precision=hi), x, k)
  for got, want in zip((y, dx, dk), (jnp.dot(x, k, precision=hi), *vjp32(g)), strict=True):
    assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 2e-2


def test_bf16_matmul_gradients_run_under_the_trainers_xla_flags(tmp_path):
  """The suite runs without the trainer's YNNPACK flags (research/xla_env.py), under which XLA
  hands bf16 dots to YNNPACK and some operand layouts fail at run time rather than at compile
  time; so every weight-gradient path of both VJPs (x @ w, and x @ w^T for the masked-LM decoder)
  runs here in a process with those flags."""
  script = tmp_path / "vjp.py"
  script.write_text(
    "import sys; sys.path.insert(0, sys.argv[1])\n"
    "from research import xla_env; xla_env.set_cpu_flags()\n"
    "import jax, jax.numpy as jnp\n"
    "from research.models.bf16 import bf16_matmul, bf16_matmul_nt\n"
    "r = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)\n"
    "for i, o in ((96, 32), (32, 96), (32, 32)):\n"
    "  x, k, g = (jax.random.normal(jax.random.key(n), s) for n, s in enumerate(((64, i), (i, o), (64, o))))\n"
    "  y, vjp = jax.vjp(jax.jit(bf16_matmul), x, k)\n"
    "  dx, dk = jax.jit(vjp)(g)\n"
    "  for got, want in ((y, r(x) @ r(k)), (dx, r(g) @ r(k).T), (dk, r(x).T @ r(g))):\n"
    "    assert float(jnp.abs(got - want).max()) < 1e-3, (i, o)\n"
    "  y, vjp = jax.vjp(jax.jit(bf16_matmul_nt), x, k.T)\n"  # x @ w^T, w stored O x I
    "  dx, dw = jax.jit(vjp)(g)\n"
    "  for got, want in ((y, r(x) @ r(k)), (dx, r(g) @ r(k).T), (dw, r(g).T @ r(x))):\n"
    "    assert float(jnp.abs(got - want).max()) < 1e-3, ('nt', i, o)\n"
    "print('ok')\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  from conftest import REPO

  out = subprocess.run([sys.executable, str(script), str(REPO)], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_bf16_matmul_model_keeps_the_parameters_and_the_meaning(minilm, tokenizer):
  """matmul_dtype=bfloat16 changes no parameter (pretrained weights load unchanged) and keeps
  the checkpoint's sentence embeddings to within bf16 rounding."""
  cfg, encoder = minilm
  b16 = dataclasses.replace(cfg, matmul_dtype="bfloat16")
  ids = jnp.zeros((1, 8), jnp.int32)
  shapes = lambda c: jax.tree.map(
    jnp.shape, BertEncoder(c).init(jax.random.key(0), ids, ids + 1, ids, train=False)["params"]
  )  # noqa: E731
  assert shapes(cfg) == shapes(b16)
  batch = tokenizer(
    ["A man is playing a guitar.", "The stock market fell sharply today."], padding=True, return_tensors="np"
  )
  args = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
  h32, _ = _encode(cfg, encoder, *args)
  h16, _ = _encode(b16, encoder, *args)
  assert h16.dtype == jnp.float32
  e32, e16 = mean_pool(h32, batch["attention_mask"]), mean_pool(h16, batch["attention_mask"])
  cos = (e32 * e16).sum(-1) / jnp.linalg.norm(e32, axis=-1) / jnp.linalg.norm(e16, axis=-1)
  assert float(cos.min()) > 0.999, cos
  assert not np.allclose(h16, h32, atol=1e-5)  # it does run in bf16
  mc = common.model_config("tiny")
  mc.matmul_dtype = "float16"
  with pytest.raises(ValueError, match="config.model.matmul_dtype='float16': expected float32 or bfloat16"):
    build.build_model(mc, 2, 100, jax.random.key(0))
  mc.matmul_dtype, mc.arch = "bfloat16", "bow"
  with pytest.raises(ValueError, match="config.model.matmul_dtype: bf16 matmuls are wired into BERT only"):
    build.build_model(mc, 2, 100, jax.random.key(0))


def test_bf16_matmul_masked_lm_decoder_matches_fp32():
  """bert_mlm with matmul_dtype=bfloat16: the tied decoder (x @ E^T) multiplies in bf16 as well,
  with the same parameters, and its logits and gradients stay within bf16 rounding of fp32's."""
  from research.models.bert import BertForMaskedLM

  cfg = BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_dropout_prob=0,
  )
  b16 = dataclasses.replace(cfg, matmul_dtype="bfloat16")
  ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 100)
  mask, types, pos = jnp.ones_like(ids), jnp.zeros_like(ids), jnp.array([[1, 5, 7], [0, 2, 11]])
  params = BertForMaskedLM(cfg).init(jax.random.key(0), ids, mask, types, pos)["params"]

  def loss(c):
    return lambda p: (BertForMaskedLM(c).apply({"params": p}, ids, mask, types, pos) ** 2).mean()

  (l32, g32), (l16, g16) = (jax.value_and_grad(loss(c))(params) for c in (cfg, b16))
  assert jax.tree.map(jnp.shape, g32) == jax.tree.map(jnp.shape, g16)
  assert abs(float(l16 - l32)) < 2e-2 * abs(float(l32)) and float(l16) != float(l32)
  for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
    assert float(jnp.abs(a - b).max()) <= 3e-2 * float(jnp.abs(b).max()) + 1e-6


def test_masked_lm_last_layer_at_masked_positions_only_is_exact():
  """last_layer_masked_only: the last layer runs for the gathered positions alone (keys and
  values from every token). Same parameters (initialized with or without positions), and the
  same logits and gradients as running it for every token and gathering after, padding included."""
  from research.models.bert import BertForMaskedLM

  cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
  ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 100)
  mask = jnp.ones_like(ids).at[1, 9:].set(0)
  types, pos = jnp.zeros_like(ids), jnp.array([[1, 5, 7, 0], [0, 2, 8, 0]])
  fast, full = BertForMaskedLM(cfg), BertForMaskedLM(cfg, last_layer_masked_only=False)
  params = fast.init(jax.random.key(0), ids, mask, types, pos)["params"]
  shapes = jax.tree.map(jnp.shape, full.init(jax.random.key(0), ids, mask, types)["params"])
  assert jax.tree.map(jnp.shape, params) == shapes

  def loss(m):
    return lambda p: (m.apply({"params": p}, ids, mask, types, pos) ** 2).mean()

  a, b = fast.apply({"params": params}, ids, mask, types, pos), full.apply({"params": params}, ids, mask, types, pos)
  assert a.shape == (2, 4, 100) and float(jnp.abs(a - b).max()) < 1e-5
  ga, gb = jax.grad(loss(fast))(params), jax.grad(loss(full))(params)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
    assert float(jnp.abs(x - y).max()) <= 1e-5 * float(jnp.abs(y).max()) + 1e-7
  # in training it is the same model under different dropout draws: finite, close in scale
  t = fast.apply({"params": params}, ids, mask, types, pos, train=True, rngs={"dropout": jax.random.key(2)})
  assert t.shape == a.shape and bool(jnp.isfinite(t).all())

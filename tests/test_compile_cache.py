"""The executable cache: a rerun loads its programs instead of tracing them, and computes the same."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TWO_BUCKETS, tiny_config

from research import compile_cache, train
from research.compile_cache import _Cached


def _counting(monkeypatch) -> list:
  """Records each trace + compile the cache falls back to."""
  built, build = [], _Cached.build

  def counted(self, *args):
    built.append(self.name)
    return build(self, *args)

  monkeypatch.setattr(_Cached, "build", counted)
  return built


def test_a_cached_program_loads_instead_of_tracing_and_any_change_misses(tmp_path, monkeypatch, caplog):
  built = _counting(monkeypatch)
  fn = jax.jit(lambda x, y: {"z": x * 2 + y}, donate_argnums=0)
  x, y = np.arange(4, dtype=np.float32), np.float32(1)
  first = compile_cache._Cached(fn, "f", '{"a": 1}', tmp_path)(jnp.asarray(x), y)
  assert built == ["f"] and len(list(tmp_path.glob("f-*.bin"))) == 1
  # A new process (an empty in-memory table) on the same folder loads it.
  again = compile_cache._Cached(fn, "f", '{"a": 1}', tmp_path)
  np.testing.assert_array_equal(again(jnp.asarray(x), y)["z"], first["z"])
  assert built == ["f"]
  # Another key, or other shapes, is another program. (Cleared first: a program JAX's in-memory
  # caches supply is not kept.)
  jax.clear_caches()
  compile_cache._Cached(fn, "f", '{"a": 2}', tmp_path)(jnp.asarray(x), y)
  again(jnp.asarray(np.arange(8, dtype=np.float32)), y)
  assert built == ["f"] * 3 and len(list(tmp_path.glob("f-*.bin"))) == 3
  # Not compiled here (an in-memory cache had it; it may have been a load): used, not kept.
  compile_cache._Cached(fn, "f", '{"a": 3}', tmp_path)(jnp.asarray(x), y)
  assert built == ["f"] * 4 and len(list(tmp_path.glob("f-*.bin"))) == 3
  # A damaged file is compiled again and replaced, with a warning naming it.
  for p in tmp_path.glob("f-*.bin"):
    p.write_bytes(b"not an executable")
  jax.clear_caches()
  with caplog.at_level(logging.WARNING):
    z = compile_cache._Cached(fn, "f", '{"a": 1}', tmp_path)(jnp.asarray(x), y)["z"]
  np.testing.assert_array_equal(z, first["z"])
  assert built == ["f"] * 5 and "did not load" in caplog.text and ".bin" in caplog.text
  built.clear()
  compile_cache._Cached(fn, "f", '{"a": 1}', tmp_path)(jnp.asarray(x), y)
  assert built == []


def test_cached_is_plain_jit_when_off():
  fn = jax.jit(lambda x: x)
  compile_cache.enable(None)
  assert compile_cache.cached(fn, "f", {}) is fn


@pytest.fixture
def without_jax_caches():
  """Programs that JAX's caches supply are not kept, and other tests fill them: off for a test."""
  from jax.experimental.compilation_cache import compilation_cache

  jax.clear_caches()
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_enable_compilation_cache", True)
  compilation_cache.reset_cache()


def test_a_rerun_loads_every_program_and_trains_identically(small_glue, tmp_path, monkeypatch, without_jax_caches):
  """Two runs of one config: the second traces nothing and writes the same metrics."""
  built = _counting(monkeypatch)
  monkeypatch.setattr(compile_cache, "_DIR", tmp_path / "executables")
  config = tiny_config(small_glue, **TWO_BUCKETS)
  runs = []
  for name in ("first", "second"):
    built.clear()
    result = train.train_and_evaluate(config, tmp_path / name)
    records = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    runs.append(([{k: v for k, v in r.items() if "sec" not in k and k != "time"} for r in records], result))
    if name == "first":
      # The train step at both bucket lengths, the eval step (dev fits the shorter), the
      # parameter copy and the norms of the logging steps.
      assert sorted(built) == ["copy_params", "eval_step", "train_step", "train_step", "update_norms"]
  assert built == []
  assert runs[0][0] == runs[1][0] and runs[0][1]["final"] == runs[1][1]["final"]
  files = sorted(p.name for p in (tmp_path / "executables").iterdir())
  assert len(files) == 5 and all(f.endswith(".bin") for f in files)
  # research.predict's program too: the second run's predictor loads what the first one's compiled.
  from research import predict

  built.clear()
  first = predict.predict_split(predict.Predictor(tmp_path / "first"), "dev", tmp_path / "p1")
  assert built == ["predict_logits"]
  second = predict.predict_split(predict.Predictor(tmp_path / "second"), "dev", tmp_path / "p2")
  assert built == ["predict_logits"] and first["accuracy"] == second["accuracy"]
  assert (tmp_path / "p1" / "sst2_dev_predictions.tsv").read_text() == (
    tmp_path / "p2" / "sst2_dev_predictions.tsv"
  ).read_text()


def test_the_oldest_files_go_first_past_the_size_limit(tmp_path):
  import os

  for i in range(5):
    (tmp_path / f"p{i}.bin").write_bytes(b"x" * 100)
    os.utime(tmp_path / f"p{i}.bin", (1000 + i, 1000 + i))  # p4 the most recently used
  compile_cache._evict(tmp_path, max_bytes=300)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["p2.bin", "p3.bin", "p4.bin"]


def test_a_program_from_jaxs_own_cache_is_not_kept(tmp_path):
  """XLA:CPU re-serializes an executable loaded from JAX's persistent cache without some of its
  kernels (the copy fails when run): such programs are used but not kept."""
  assert jax.config.jax_compilation_cache_dir  # conftest's session cache
  fn = lambda x: jnp.tanh(x) * 7.25 + jnp.broadcast_to(x.sum(), x.shape)  # noqa: E731
  x = jnp.ones((8, 8))
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    jax.jit(fn).lower(x).compile()  # into JAX's cache
    jax.clear_caches()  # and out of its in-memory ones
    out = compile_cache._Cached(jax.jit(fn), "g", "{}", tmp_path)(x)
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
  np.testing.assert_allclose(out, fn(x), rtol=1e-6)
  assert not list(tmp_path.glob("*.bin"))


def test_a_loaded_program_keeps_the_mesh_device_order(tmp_path, monkeypatch):
  """On a mesh whose devices are not in id order, each shard of a loaded program's output is
  the one the compiled program puts on that device."""
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices())[[3, 1, 0, 2, 7, 5, 4, 6]], ("data",))
  sh = NamedSharding(mesh, P("data"))

  def f(x):  # each shard is marked with its position on the mesh
    return jax.shard_map(
      lambda b: b * 10 + jax.lax.axis_index("data"), mesh=mesh, in_specs=P("data"), out_specs=P("data")
    )(x)

  fn = jax.jit(f, in_shardings=sh, out_shardings=sh)
  x = jax.device_put(jnp.arange(8.0), sh)
  built = _counting(monkeypatch)
  compiled = compile_cache._Cached(fn, "o", "{}", tmp_path)(x)
  loaded = compile_cache._Cached(fn, "o", "{}", tmp_path)(x)
  assert built == ["o"]  # the second came from the file
  np.testing.assert_array_equal(loaded, np.arange(8.0) * 11)
  for a, b in zip(compiled.addressable_shards, loaded.addressable_shards, strict=True):
    assert a.device == b.device
    np.testing.assert_array_equal(a.data, b.data)


def test_generation_loads_its_programs_and_samples_the_same(tmp_path, monkeypatch, without_jax_caches):
  """research.generate's programs (one per window length) load in a new process, same tokens."""
  from research import generate
  from research.models.gpt import GPT, GPTConfig

  built = _counting(monkeypatch)
  monkeypatch.setattr(compile_cache, "_DIR", tmp_path)
  model = GPT(GPTConfig(vocab_size=17, block_size=24, num_layers=2, num_heads=2, hidden_size=16))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  runs = []
  for _ in range(2):
    generate._program.cache_clear()  # as in a new process
    prompt = np.zeros((2, 3), np.int32)
    runs.append(generate.generate_long(params, prompt, jax.random.key(0), model=model, max_new_tokens=50, top_k=5))
    if len(runs) == 1:
      assert built == ["generate"] * 3  # the first window (21 new tokens), then 12 at a time, then the last 5
  assert built == ["generate"] * 3
  np.testing.assert_array_equal(runs[0], runs[1])

"""8 fake CPU devices and strict numpy rank promotion, set before JAX initializes."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The suite's time is mostly XLA:CPU compiling small programs, and LLVM at -O0 halves it (the tiny
# model's train step: 5.8 -> 2.2 s on the CI machine). The HLO passes, and so the programs' math,
# are unchanged; both sides of every same-run comparison get the same flag; subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# One persistent compilation cache for the session: the controller makes it, and the xdist workers
# and the runs they start in subprocesses inherit it through the environment, so the many runs of
# the same tiny model load the step instead of compiling it again (the two multiprocess tests:
# 239 -> 208 s; test_train.py with them: 645 -> 523 s). A cached executable is the one XLA built.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="research-tests-jax-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "fixtures"))

from research.data.sources import default_glue_dir  # noqa: E402

GLUE_DIR = Path(default_glue_dir())


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
  if not (GLUE_DIR / "sst2" / "train.tsv").exists() and not (GLUE_DIR / "SST-2" / "train.tsv").exists():
    pytest.fail(f"GLUE data not found at {GLUE_DIR}; set $GLUE_DIR (tests read ../shared/data/glue by default)")
  return GLUE_DIR


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
  from research.models.convert import resolve_pretrained

  return resolve_pretrained("minilm")


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
  import transformers

  return transformers.AutoTokenizer.from_pretrained(str(minilm_dir))


def _write_small_glue(root: Path, glue_dir: Path) -> Path:
  """A GLUE folder with the first rows of the real SST-2 train/dev files."""
  src, dst = glue_dir / "sst2", root / "glue" / "sst2"
  dst.mkdir(parents=True)
  for split, n in (("train", 97), ("dev", 41)):
    lines = (src / f"{split}.tsv").read_text().splitlines()[: n + 1]
    (dst / f"{split}.tsv").write_text("\n".join(lines) + "\n")
  return root / "glue"


@pytest.fixture
def small_glue(tmp_path, glue_dir) -> Path:
  return _write_small_glue(tmp_path, glue_dir)


@pytest.fixture(scope="module")
def module_glue(tmp_path_factory, glue_dir) -> Path:
  return _write_small_glue(tmp_path_factory.mktemp("module_glue"), glue_dir)


TWO_BUCKETS = {"data.buckets": (16, 32)}


def tiny_config(glue: Path, **overrides):
  """A seconds-long SST-2 run on the tiny random-init model."""
  from configs import common
  from configs import glue as glue_cfg

  c = glue_cfg.get_config("task=sst2,model=tiny")
  c.unlock()
  c.data.glue_dir = str(glue)
  # One shape: every other bucket is one more train program and one more eval program to trace
  # and compile (or load) per run. The tests of resume and the end-to-end test pass TWO_BUCKETS.
  c.data.buckets = (32,)
  c.data.max_length = 32
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_train_steps = 8
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 2
  c.log_every_steps = 2
  c.progress = False
  c.data.prefetch = 2
  common.set_fields(c, overrides)
  c.lock()
  return c

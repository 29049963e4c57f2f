"""Entry point: parse flags, join a multi-host run if asked, train.

python -m research.main --config configs/glue.py:task=sst2,model=minilm --workdir runs/sst2
"""

import logging
import os
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

from research import compile_cache, parallel, train

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/glue.py:task=sst2", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard events go.")
_CACHE = flags.DEFINE_string(
  "compilation_cache", os.path.expanduser("~/.cache/research/jax"), "JAX persistent compilation cache ('' = off)."
)
_EXECUTABLES = compile_cache.define_flag()
flags.mark_flags_as_required(["config", "workdir"])


# XLA:CPU fuses dots and reductions into YNNPACK kernels with this: the 0.8M-parameter GPT step
# is 1.13x faster (benchmarks/xla_cpu_flags.py) and the MiniLM step unchanged. Set before the
# backend starts; a user's own XLA_FLAGS win.
_CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"


def main(argv):
  del argv
  if "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _CPU_FLAGS).strip()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s] %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
  compile_cache.enable(_EXECUTABLES.value)
  config = _CONFIG.value
  parallel.maybe_initialize_distributed(config.distributed)
  result = train.train_and_evaluate(config, Path(_WORKDIR.value))
  logging.info("done: %s", result)


if __name__ == "__main__":
  app.run(main)

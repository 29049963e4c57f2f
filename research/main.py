"""Entry point: parse flags, join a multi-host run if asked, train.

python -m research.main --config configs/glue.py:task=sst2,model=minilm --workdir runs/sst2
"""

import logging
import os
import re
import sys
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

from research import compile_cache, parallel, train, xla_env

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/glue.py:task=sst2", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard events go.")
_CACHE = flags.DEFINE_string(
  "compilation_cache", os.path.expanduser("~/.cache/research/jax"), "JAX persistent compilation cache ('' = off)."
)
_EXECUTABLES = flags.DEFINE_string("executable_cache", compile_cache.DEFAULT_DIR, compile_cache.FLAG_HELP)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a --config override of a key the config lacks reported as a flag
  error (one line naming the flag and the nearest key) instead of ml_collections' traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: KeyError("'lrr'\nDid you mean ...")
    err = e
    while err.args and isinstance(err.args[0], BaseException):
      err = err.args[0]
    key, *hint = str(err.args[0] if err.args else err).splitlines() or [""]
    if not re.fullmatch(r"'[^'\s]+'", key):  # not a missing key: the error as it is
      raise
    flags_given = (a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config."))
    named = [f for f in flags_given if key.strip("'") in f.split(".")[1:]]
    sys.stderr.write(
      f"FATAL Flags parsing error: {' '.join(named) or '--config'}: the config has no key {key}. {' '.join(hint)}".rstrip()
      + "\n"
    )
    sys.exit(1)


def main(argv):
  del argv
  xla_env.prepare_process()  # XLA:CPU flags (a user's own XLA_FLAGS win) and heap, before the backend starts
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
  app.run(main, flags_parser=parse_flags)

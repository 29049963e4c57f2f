"""research/xla_env.py: the process settings made before JAX's backend starts."""

import os
import platform
import subprocess
import sys

import pytest
from conftest import REPO

# In a fresh process: the settings the entry points make, then a jitted program whose scratch
# buffer is 256 MB (an 8192 x 8192 fp32 activation between two matmuls, as in a train step) run
# sixteen times; prints whether the heap setting was made and the page faults of the last five
# runs (65,536 a run whose buffer the kernel maps anew). The kept heap grows by a buffer on some
# of the first runs (a small allocation can take part of a freed buffer; up to run 8 in 8 traced
# tries), then holds. With "noop" as argv[1] it runs nothing.
PROBE = """
import resource, sys
from research import xla_env
xla_env.set_cpu_flags()
kept = xla_env.keep_step_buffers()
if sys.argv[1:] == ["noop"]:
  print(kept, 0)
  raise SystemExit
import jax, jax.numpy as jnp
x = jnp.ones((8192, 64), jnp.float32)
f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes >= 8192 * 8192 * 4
faults = []
for _ in range(16):
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
print(kept, faults[-1] - faults[-6])
"""


def _probe(*argv, **env) -> tuple[str, int]:
  full = {k: v for k, v in os.environ.items() if k not in ("RESEARCH_HOST_MALLOC", "JAX_PLATFORMS")}
  out = subprocess.run(
    [sys.executable, "-c", PROBE, *argv], env=dict(full, **env), cwd=REPO, capture_output=True, text=True, check=True
  )
  kept, faults = out.stdout.split()
  return kept, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_keep_host_memory_reuses_the_steps_buffers():
  kept, faults = _probe()
  assert kept == "True" and faults < 65536  # the freed scratch buffer is reused from the heap
  kept, faults = _probe(RESEARCH_HOST_MALLOC="default")  # the opt-out: glibc maps it afresh each time
  assert kept == "False" and faults > 5 * 60000
  kept, _ = _probe("noop", JAX_PLATFORMS="cuda")  # an accelerator run keeps glibc's defaults
  assert kept == "False"
  kept, _ = _probe("noop", JAX_PLATFORMS="cpu")
  assert kept == "True"


def test_unroll_threefry_gives_the_same_bits_without_the_loop(monkeypatch):
  import jax
  import numpy as np
  from jax._src.interpreters import mlir
  from jax._src.random import threefry2x32 as threefry

  from research import xla_env
  from research.models.dropout import dropout

  def draws(key):  # a key derivation (a few counters), a mask's bits (6,144 counters), bernoulli (600)
    x = jax.numpy.ones((4, 12, 16, 16))
    return dropout(x, 0.1, jax.random.fold_in(key, 7), "jax"), jax.random.bernoulli(key, 0.3, (20, 30))

  key = jax.random.key(3)
  loops = lambda fn: fn.lower(key).compile().as_text().count(" while(")  # noqa: E731
  rolled = jax.jit(lambda k: draws(k))  # a new function for each: each is lowered anew
  monkeypatch.setenv("RESEARCH_THREEFRY", "rolled")
  assert not xla_env.unroll_threefry()  # the opt-out
  monkeypatch.delenv("RESEARCH_THREEFRY")
  try:
    assert xla_env.unroll_threefry()
    unrolled = jax.jit(lambda k: draws(k))
    assert loops(unrolled) == 2  # the key derivation's and bernoulli's 600 counters keep the loop
    unrolled_draws = unrolled(key)  # run while the rule is in place
  finally:  # JAX's own rule again, for the other tests in this process
    mlir.register_lowering(threefry.threefry2x32_p, threefry._threefry2x32_cpu_lowering_rule, platform="cpu")
  assert loops(rolled) == 3
  for a, b in zip(rolled(key), unrolled_draws, strict=True):
    np.testing.assert_array_equal(a, b)

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

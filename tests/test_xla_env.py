"""research/xla_env.py: the process settings made before JAX's backend starts."""

import os
import platform
import subprocess
import sys

import pytest
from conftest import REPO

# In a fresh process: keep_host_memory, then on a second thread (as XLA:CPU allocates a step's
# scratch buffer) a 256 MB buffer malloc'ed, written and freed four times; prints whether the setting
# was made and the page faults per buffer after the first (65,536 when the kernel maps it anew).
PROBE = """
import ctypes, resource, threading
from research import xla_env
kept = xla_env.keep_host_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
n, faults = 1 << 28, []
def steps():
  for _ in range(4):
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    buf = libc.malloc(n); ctypes.memset(buf, 1, n); libc.free(buf)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
t = threading.Thread(target=steps); t.start(); t.join()
print(kept, (faults[-1] - faults[1]) / 3)
"""


def _probe(**env) -> tuple[str, float]:
  full = {k: v for k, v in os.environ.items() if k not in ("RESEARCH_HOST_MALLOC", "JAX_PLATFORMS")}
  out = subprocess.run(
    [sys.executable, "-c", PROBE], env=dict(full, **env), cwd=REPO, capture_output=True, text=True, check=True
  )
  kept, faults = out.stdout.split()
  return kept, float(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_keep_host_memory_reuses_freed_buffers():
  kept, faults = _probe()
  assert kept == "True" and faults < 1000  # the freed buffer is reused from the heap
  kept, faults = _probe(RESEARCH_HOST_MALLOC="default")  # the opt-out: glibc maps it afresh each time
  assert kept == "False" and faults > 60000
  kept, _ = _probe(JAX_PLATFORMS="cuda")  # an accelerator run keeps glibc's per-thread arenas
  assert kept == "False"
  kept, _ = _probe(JAX_PLATFORMS="cpu")
  assert kept == "True"

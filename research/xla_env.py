"""Process settings for XLA:CPU that must be made before JAX's backend starts: its flags, how
glibc's malloc keeps the memory of each step's buffers, and which thread runs the steps; and,
before the first program is lowered, how Threefry's random bits are lowered for the CPU."""

from __future__ import annotations

import ctypes
import importlib.metadata
import math
import os
import platform

# YNNPACK kernels for dots with the elementwise work XLA fuses into them, and for reductions:
# the 0.8M-parameter GPT step is 1.13x faster (benchmarks/xla_cpu_flags.py), the MiniLM step
# unchanged. `individual_dot` as well: without it XLA's float normalization counts a bf16 dot as
# unsupported and runs it in fp32, so `model.matmul_dtype=bfloat16` would buy nothing (0.36 s
# against 0.20 s per MiniLM 4 x 128 step with it, on an AMX host).
CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce,individual_dot"

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
MALLOC_ENV = "RESEARCH_HOST_MALLOC"  # "default" leaves glibc's malloc as it is

# Threefry calls over at least this many counters are lowered unrolled on the CPU (see
# `unroll_threefry`); smaller ones (deriving keys: fold_in, split) keep JAX's loop.
THREEFRY_UNROLL_MIN = 1024
THREEFRY_ENV = "RESEARCH_THREEFRY"  # "rolled" leaves JAX's own CPU lowering


def prepare_process() -> None:
  """What research.main, predict and generate do before JAX's backend starts: the XLA:CPU flags,
  the heap setting and, with it, steps run on the calling thread; and Threefry unrolled."""
  set_cpu_flags()
  keep_step_buffers()
  unroll_threefry()


def keep_step_buffers() -> bool:
  """The heap setting for a JAX process: `keep_host_memory`, and where it was made, steps on the
  calling thread (`run_cpu_steps_on_caller`), without which XLA's threads would allocate the step
  buffers outside the kept heap. Returns whether it was made. (A process without JAX, such as a
  PyTorch reference, calls `keep_host_memory` alone.)"""
  if not keep_host_memory():
    return False
  run_cpu_steps_on_caller()
  return True


def set_cpu_flags() -> None:
  """Adds CPU_FLAGS to XLA_FLAGS unless the user set the YNNPACK fusion types themselves."""
  if "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_FLAGS).strip()


def keep_host_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of returning it to the kernel, on a
  CPU-only JAX (no GPU/TPU plugin installed, or JAX_PLATFORMS=cpu...). Returns whether it did.

  Why: XLA:CPU allocates a step's scratch buffer (1.1 GB for the MiniLM 32 x 128 train step,
  4.2-4.6 GB for BERT-base) with malloc and frees it after the step. glibc serves a request that
  large with a fresh mmap each time (it is above the 32 MB mmap threshold), so the kernel
  zero-fills every page again at first touch: ~280k page faults a MiniLM step, ~1.1M a BERT-base
  step. No mmap and no trimming keep the buffer in the main heap, where the next step reuses it:
  0 faults, and the 32 x 128 train steps 1.13-1.37x faster on the Intel AMX host
  (benchmarks/train_step.py --default-malloc). This holds for memory malloc'ed on the main
  thread only: a thread's own arena maps whatever its 64 MB heaps cannot hold regardless, which
  is why JAX's steps must run on the calling thread (`keep_step_buffers` makes both settings).
  The earlier way, one malloc arena for every thread, made XLA's parallel compilation contend for
  it (the MiniLM step compiled in 8.3-9.3 s instead of 5.7-6.0 s on 2 cores) and fragmented the
  heap (peak RSS 1.5-2.6x). Call it before JAX starts.
  RESEARCH_HOST_MALLOC=default skips it.
  """
  if os.environ.get(MALLOC_ENV, "") == "default" or platform.system() != "Linux":
    return False
  if platform.libc_ver()[0] != "glibc" or not _cpu_only():
    return False
  libc = ctypes.CDLL("libc.so.6")
  # trim threshold -1: never give the heap's top back (mallopt(3): "disables trimming completely")
  settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def run_cpu_steps_on_caller() -> None:
  """Turns off JAX's asynchronous dispatch on the CPU (before its backend starts), so that a
  compiled step runs on the thread that calls it, not on one of XLA's, and its buffers come from
  the main thread's heap that `keep_host_memory` keeps. The call then returns when the step is
  done (with the GIL released meanwhile, so input threads run on), and what the trainer loses is
  the overlap of its Python between steps (the next batch, the previous step's metrics) with the
  step's compute. Programs over several CPU devices still run on XLA's threads."""
  import jax

  jax.config.update("jax_cpu_enable_async_dispatch", False)


def unroll_threefry(min_size: int = THREEFRY_UNROLL_MIN) -> bool:
  """Lowers JAX's Threefry hash for the CPU unrolled, as on GPU and TPU, wherever it hashes at
  least `min_size` counters: the random bits of dropout masks. Returns whether it could.

  Why: on the CPU JAX lowers Threefry's 20 rounds as a loop of 5 iterations, to compile faster;
  over a mask's bits each iteration is a pass that reads and writes two arrays the size of the
  mask, where unrolled XLA computes the bits in one fused pass, inside the fusion that compares
  them. The bits are the same (the same arithmetic in the same order; a MiniLM 32 x 128 train
  step gives bit-identical parameters), and on the Intel AMX host the fp32 32 x 128 train step is
  1.22x (MiniLM) and 1.13x (BERT-base) faster and compiles 1.5x faster, with fewer loops
  (`benchmarks/train_step.py --rolled-threefry`). Key derivations (a few counters each) keep the
  loop: unrolled they only made the executable slower to load. The hook is JAX's own
  lowering registry (`jax._src`, JAX 0.12): with another JAX that lacks it, nothing changes.
  Programs lowered before the call are not affected; it does nothing for GPU and TPU programs.
  RESEARCH_THREEFRY=rolled skips it.
  """
  if os.environ.get(THREEFRY_ENV, "") == "rolled":
    return False
  try:
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32 as threefry

    primitive = threefry.threefry2x32_p
    unrolled, rolled = threefry._threefry2x32_lowering_rule, threefry._threefry2x32_cpu_lowering_rule
  except (ImportError, AttributeError):
    return False

  def lowering(ctx, *args):
    return (unrolled if math.prod(ctx.avals_out[0].shape) >= min_size else rolled)(ctx, *args)

  mlir.register_lowering(primitive, lowering, platform="cpu")
  return True


def _cpu_only() -> bool:
  """Whether JAX will compute on the CPU: JAX_PLATFORMS starts with cpu, or it is unset and no
  accelerator plugin (jax-cuda*, jax-rocm*, libtpu) is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  names = (str(d.metadata["Name"] or "").lower().replace("_", "-") for d in importlib.metadata.distributions())
  return not any(n.startswith(("jax-cuda", "jax-rocm", "libtpu")) for n in names)

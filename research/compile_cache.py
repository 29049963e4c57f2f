"""Compiled programs kept on disk, so that a rerun skips tracing and lowering too.

JAX's persistent compilation cache (on by default, `research/main.py`) is keyed on the lowered
program: a warm start still traces the step in Python and lowers it to StableHLO before the
cache can be asked, ~1.9 s of the MiniLM step's 3.1 s warm start (benchmarks/results/PERFORMANCE.md, "Compile time").
This cache is keyed on what decides the program instead, and stores the executable itself
(`jax.experimental.serialize_executable`):

- the source of every module that can shape it: all of `research/`, and every module loaded
  from outside the Python installation (the config files, a user's own losses);
- `key`, from the caller: the config, and whatever else it bakes into the program (the
  model's architecture read from a weights folder, the number of steps the schedule spans);
- the arguments' tree, shapes, dtypes and shardings;
- the installed packages' versions, the JAX flags, `XLA_FLAGS`, and the devices (the CPU's
  model and feature flags too: an executable for one CPU can crash another).

Anything else a caller bakes into a program must go into `key`: that is the price of skipping
the trace. Only programs XLA has just compiled are saved: one that JAX's persistent cache
supplied runs, but is not kept (see `_load_or_compile`).

Off unless `enable(dir)` is called (`research.main`, `research.predict` and `research.generate`
do, with their `--executable_cache` folder, default `~/.cache/research/executables`; '' turns
it off). On several processes, or when an executable cannot be serialized, programs fall back
to plain `jax.jit`. A file that fails to load is compiled again and replaced.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import pickle
import sys
import sysconfig
import zlib
from collections.abc import Callable
from pathlib import Path

import jax
from jax.experimental import serialize_executable

from research import writers, xla_env

log = logging.getLogger(__name__)

_DIR: Path | None = None
# The entry points' `--executable_cache` flag (research.main, research.predict, research.generate).
DEFAULT_DIR = os.path.expanduser("~/.cache/research/executables")
FLAG_HELP = (
  "Compiled programs kept on disk, keyed on the source, config and shapes, so reruns skip tracing too "
  "('' = off; research/compile_cache.py)."
)
MAX_BYTES = 4 * 2**30  # past this the least recently used files are deleted
# How each compile went, from JAX's monitoring events: a backend compile (the XLA compilation,
# or a load from JAX's persistent cache) and a persistent-cache hit.
_events = {"/jax/core/compile/backend_compile_duration": 0, "/jax/compilation_cache/cache_hits": 0}


def _count(event: str, *_, **__) -> None:
  if event in _events:
    _events[event] += 1


jax.monitoring.register_event_listener(_count)
jax.monitoring.register_event_duration_secs_listener(_count)


def enable(directory: str | os.PathLike | None) -> None:
  """Keep executables under `directory` (None: off)."""
  global _DIR
  _DIR = Path(directory) if directory else None


def cached(fn: Callable, name: str, key) -> Callable:
  """`fn` (a `jax.jit` function) with its executables kept on disk; `fn` itself when off."""
  if _DIR is None or jax.process_count() > 1:
    return fn
  return _Cached(fn, name, json.dumps(key, sort_keys=True, default=repr), _DIR)


class _Cached:
  def __init__(self, fn, name: str, key: str, directory: Path):
    self.fn, self.name, self.key, self.dir = fn, name, key, directory
    self.compiled: dict = {}  # argument signature -> a jax.stages.Compiled

  def __call__(self, *args):
    return self.compile(*args)(*args)

  def compile(self, *args):
    """The executable for these arguments: in memory, else from disk, else compiled and saved."""
    leaves, tree = jax.tree.flatten(args)
    sig = (
      tree,
      tuple((x.shape, x.dtype, getattr(x, "weak_type", False), getattr(x, "sharding", None)) for x in leaves),
    )
    if sig not in self.compiled:
      self.compiled[sig] = self._load_or_compile(args, sig)
    return self.compiled[sig]

  def build(self, *args):
    """Trace, lower and compile (XLA's own persistent cache may still skip the last)."""
    return self.fn.lower(*args).compile()

  def _load_or_compile(self, args, sig):
    digest = hashlib.sha256("\n".join([_environment(), self.name, self.key, repr(sig)]).encode()).hexdigest()
    path = self.dir / f"{self.name}-{digest[:32]}.bin"
    if path.exists():
      try:
        blob, in_tree, out_tree, device_ids = pickle.loads(zlib.decompress(path.read_bytes()))
        devices = {d.id: d for d in jax.devices()}
        compiled = serialize_executable.deserialize_and_load(
          blob, in_tree, out_tree, execution_devices=[devices[i] for i in device_ids]
        )
        with contextlib.suppress(OSError):
          os.utime(path)  # recently used: kept longest
        return compiled
      except Exception as e:  # noqa: BLE001 - any unreadable file is compiled again
        log.warning("executable cache: %s did not load (%s: %s); compiling again", path, type(e).__name__, e)
    before = dict(_events)
    compiled = self.build(*args)
    compiles, hits = (_events[k] - before[k] for k in _events)
    if compiles != 1 or hits:
      # Loaded from JAX's persistent cache (a hit), or taken from its in-memory caches (no
      # compile: perhaps a load earlier in this process). XLA:CPU (jax 0.12) serializes a
      # loaded executable without some of its kernels ("Function ... not found" when the copy
      # runs), so only programs XLA compiled just now are kept.
      log.info("executable cache: %s was not compiled here; not kept", self.name)
      return compiled
    try:
      # The devices it runs on, in order (one device, or a mesh's), which loading must be told.
      device_ids = [d.id for d in compiled._executable.xla_executable.local_devices()]
      # zlib at level 1: a MiniLM step's 5.1 MB to 0.96 MB in 47 ms (23 ms to read back).
      data = zlib.compress(pickle.dumps((*serialize_executable.serialize(compiled), device_ids)), 1)
    except Exception as e:  # noqa: BLE001 - e.g. a backend without serialization: run uncached
      log.warning("executable cache: %s cannot be serialized (%s); not kept", self.name, e)
      return compiled
    try:
      self.dir.mkdir(parents=True, exist_ok=True)
      writers.write_atomic(path, data)  # a killed run leaves no half-written file under the real name
      _evict(self.dir)
    except OSError as e:  # a full disk or a read-only folder costs the next run its trace, no more
      log.warning("executable cache: %s not saved (%s)", path, e)
    return compiled


def _evict(directory: Path, max_bytes: int = MAX_BYTES) -> None:
  files = sorted(directory.glob("*.bin"), key=lambda p: p.stat().st_mtime, reverse=True)
  total = 0
  for p in files:
    total += p.stat().st_size
    if total > max_bytes:
      p.unlink(missing_ok=True)


@functools.cache
def _environment() -> str:
  """Everything outside the caller's key that decides a program; once per process."""
  paths = sysconfig.get_paths()
  installed = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
  site = {paths[k] for k in ("purelib", "platlib")}
  package = Path(__file__).resolve().parent
  sources = set(package.rglob("*.py"))
  for module in list(sys.modules.values()):
    f = getattr(module, "__file__", None)
    if f and f.endswith(".py") and not any(f.startswith(p) for p in installed):
      sources.add(Path(f).resolve())
  # By content alone, so two checkouts of the same code share their files.
  digests = sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in sources if f.is_file())
  devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
  backend = jax.devices()[0].client
  return json.dumps(
    {
      "sources": hashlib.sha256("".join(digests).encode()).hexdigest(),
      # Every installed distribution's name and version (`<name>-<version>.dist-info`).
      "packages": sorted(f for p in site if os.path.isdir(p) for f in os.listdir(p) if f.endswith(".dist-info")),
      "python": sys.version,
      "jax_config": {k: repr(v) for k, v in jax.config.values.items() if k != "jax_compilation_cache_dir"},
      # THREEFRY_ENV: whether xla_env.unroll_threefry changed Threefry's CPU lowering.
      "env": {
        k: os.environ.get(k, "")
        for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "CUDA_VISIBLE_DEVICES", xla_env.THREEFRY_ENV)
      },
      "devices": devices,
      "platform_version": backend.platform_version,
      "cpu": _cpu_flags(),
    },
    sort_keys=True,
  )


def _cpu_flags() -> str:
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    import platform

    return platform.processor()
  return " ".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))

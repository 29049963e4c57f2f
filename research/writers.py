"""Where a run's numbers go: metrics.jsonl, TensorBoard events, and a progress line.

Only process 0 writes; on other processes every method is a no-op.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax


def write_atomic(path: str | Path, data: str | bytes) -> None:
  """`data` into `path` through a temporary file and a rename, so that a reader (the run's other
  processes, predict.py, a rerun) never sees the file half-written, nor a killed writer leaves one."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


class MetricWriter:
  def __init__(self, workdir: str | Path, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboard.summary import Writer  # writes event files without TensorFlow

    path = Path(workdir) / "metrics.jsonl"
    if path.exists():  # a resumed run re-does the steps after its checkpoint: drop their old records
      kept = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= resume_step]
      write_atomic(path, "".join(r + "\n" for r in kept))
    self.jsonl = open(path, "a", buffering=1)  # noqa: SIM115  (closed in close())
    self.tb = Writer(str(Path(workdir) / "tensorboard"))

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self.jsonl.write(
      json.dumps({"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}) + "\n"
    )
    for k, v in metrics.items():
      self.tb.add_scalar(f"{split}/{k}", float(v), step=int(step))
    self.tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def _hms(seconds: float) -> str:
  s = int(max(seconds, 0))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
  """`step 1200/6315 [19%] 212 ex/s, ETA 0:24:03 | loss 0.31 acc 0.89`, on stderr.

  The rate is measured from the end of the first step this process runs, so compilation does
  not skew the ETA; the same figures go to metrics.jsonl as `steps_per_sec` and `examples_per_sec`.
  """

  def __init__(self, total_steps: int, batch_size: int, first_step: int, enabled: bool = True):
    self.total, self.batch_size = total_steps, batch_size
    self.enabled = enabled and jax.process_index() == 0
    self.t0, self.step0 = None, first_step
    self.start_time = time.perf_counter()

  def start(self, step: int) -> None:
    """Start the timer at `step` (a step that has finished), unless it runs already."""
    if self.t0 is None:
      self.t0, self.step0 = time.perf_counter(), step

  def rate(self, step: int) -> float:
    """Steps per second since the timer started (0 until it has)."""
    if self.t0 is None:
      self.start(step)
      return 0.0
    dt = time.perf_counter() - self.t0
    return (step - self.step0) / dt if dt > 0 else 0.0

  def update(self, step: int, summary: str = "") -> dict[str, float]:
    r = self.rate(step)
    eta = (self.total - step) / r if r else float("nan")
    if self.enabled:
      pct = 100 * step / max(self.total, 1)
      ex = r * self.batch_size
      eta_s = _hms(eta) if r else "?"
      line = f"step {step}/{self.total} [{pct:.0f}%] {ex:.1f} ex/s, ETA {eta_s}, elapsed {_hms(time.perf_counter() - self.start_time)}"
      print(f"{line} | {summary}" if summary else line, file=sys.stderr, flush=True)
    return {"steps_per_sec": r, "examples_per_sec": r * self.batch_size}

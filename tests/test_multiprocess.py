"""A real two-process run: jax.distributed on localhost, 4 CPU devices per process, gloo collectives.

It must match the single-process 8-device run, and its checkpoint must continue in one process.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
from conftest import REPO
from test_train import _final_params

_CHILD = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {repo!r})
    import jax
    workdir, glue, pid, nproc, port, steps = sys.argv[1:7]
    pid, nproc, steps = int(pid), int(nproc), int(steps)
    from pathlib import Path
    from conftest import tiny_config  # sets 8 devices: override it after
    from research import train
    jax.config.update("jax_num_cpu_devices", 8 // nproc)
    if nproc > 1:
      jax.distributed.initialize(coordinator_address=f"localhost:{{port}}", num_processes=nproc, process_id=pid)
    assert jax.device_count() == 8, jax.devices()
    config = tiny_config(Path(glue), num_train_steps=steps, checkpoint_every_steps=3, eval_every_steps=3)
    print("RESULT", train.train_and_evaluate(config, workdir))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, glue, nproc, steps, wait=True):
  script = _CHILD.format(tests=str(REPO / "tests"), repo=str(REPO))
  port = str(_free_port())
  env = os.environ | {"HF_HUB_OFFLINE": "1"}
  # Output goes to files, not pipes: a child blocks once a pipe nobody reads fills up (64 KiB
  # of INFO logs), which stalled the SIGTERM test while it polled for progress.
  w = Path(workdir)
  logs = [(w.parent / f"{w.name}.{port}.out{pid}", w.parent / f"{w.name}.{port}.err{pid}") for pid in range(nproc)]
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", script, str(workdir), str(glue), str(pid), str(nproc), port, str(steps)],
      env=env,
      stdout=open(out, "w"),  # noqa: SIM115 (the child owns it)
      stderr=open(err, "w"),  # noqa: SIM115
    )
    for pid, (out, err) in enumerate(logs)
  ]
  if not wait:
    return procs, logs
  return _finish(procs, logs)


def _finish(procs, logs, timeout=600):
  for p in procs:
    p.wait(timeout=timeout)
  # Every failed process's log: the first to fail is often not process 0 (which then times out
  # waiting for it in a collective).
  failed = [
    f"process {i}:\n{err.read_text()[-3000:]}" for i, (p, (_, err)) in enumerate(zip(procs, logs)) if p.returncode
  ]
  assert not failed, "\n\n".join(failed)
  return [out.read_text() for out, _ in logs]


def test_two_processes_match_one_and_checkpoints_cross_over(small_glue, tmp_path):
  _launch(tmp_path / "one", small_glue, nproc=1, steps=6)
  outs = _launch(tmp_path / "two", small_glue, nproc=2, steps=6)
  assert all("RESULT" in o for o in outs)
  s1, p1 = _final_params(tmp_path / "one")
  s2, p2 = _final_params(tmp_path / "two")
  assert s1 == s2 == 6
  # Same global batches, same math; only the all-reduce order may differ.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p2)
  dev = lambda wd: [r for r in (wd / "metrics.jsonl").read_text().splitlines() if '"split": "dev"' in r]  # noqa: E731
  assert len(dev(tmp_path / "two")) == 2  # only process 0 wrote metrics
  # The two-process checkpoint continues in one process, and the reverse.
  _launch(tmp_path / "two", small_glue, nproc=1, steps=9)
  _launch(tmp_path / "one", small_glue, nproc=2, steps=9)
  s3, p3 = _final_params(tmp_path / "two")
  s4, p4 = _final_params(tmp_path / "one")
  assert s3 == s4 == 9
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p3, p4)


def test_sigterm_to_both_processes_saves_one_step_and_resumes_exactly(small_glue, tmp_path):
  """SIGTERM reaches the two processes at different moments; they agree on one step to save
  (train._Preemption all-gathers the flag), exit cleanly, and the rerun ends where a run that
  was never interrupted ends."""
  import json
  import signal
  import time

  steps = 25
  procs, logs = _launch(tmp_path / "pre", small_glue, nproc=2, steps=steps, wait=False)
  metrics = tmp_path / "pre" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (
    metrics.exists() and any(json.loads(r)["step"] >= 8 for r in metrics.read_text().splitlines())
  ):
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  time.sleep(0.05)
  procs[0].send_signal(signal.SIGTERM)
  outs = _finish(procs, logs, timeout=300)
  assert all("'preempted': True" in o for o in outs)
  saved, _ = _final_params(tmp_path / "pre")
  assert 8 <= saved < steps and saved % 5 == 0  # agreed at a check step
  _launch(tmp_path / "pre", small_glue, nproc=2, steps=steps)
  _launch(tmp_path / "straight", small_glue, nproc=2, steps=steps)
  s_pre, p_pre = _final_params(tmp_path / "pre")
  s_str, p_str = _final_params(tmp_path / "straight")
  assert s_pre == s_str == steps
  jax.tree.map(np.testing.assert_array_equal, p_pre, p_str)

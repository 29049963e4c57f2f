"""The sweep runner: runs override dicts x seeds, skips finished runs, writes tables and plots."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from research import sweep

REPO = Path(__file__).resolve().parents[1]

CONFIG = '''
"""Tiny sweep for the tests."""
import os
from configs import glue

def get_config(arg=None):
  c = glue.get_config("task=sst2,model=tiny")
  c.unlock()
  c.data.glue_dir = os.environ["SWEEP_TEST_GLUE"]
  c.data.buckets, c.data.max_length = (16, 32), 32
  c.batch_size = c.eval_batch_size = 16
  c.num_train_steps, c.eval_every_steps, c.log_every_steps = 6, 3, 3
  c.lock()
  return c

def sweep():
  return [{"optimizer.lr": 1e-3}, {"_name": "sgd", "optimizer.name": "sgd", "optimizer.lr": 0.1}]
'''


def _sweep(cfg: Path, root: Path, *flags: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "research.sweep", f"--config={cfg}", f"--workdir={root}", "--seeds=0,1", *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_sweep_runs_skips_and_aggregates(small_glue, tmp_path):
  cfg = tmp_path / "tiny_sweep.py"
  cfg.write_text(CONFIG)
  os.environ["SWEEP_TEST_GLUE"] = str(small_glue)
  root = tmp_path / "sweep"
  printed = _sweep(cfg, root, "--print_commands")
  assert printed.returncode == 0, printed.stderr
  lines = printed.stdout.splitlines()
  assert len(lines) == 4 and "--config.optimizer.name=sgd" in lines[2] and "--config.seed=1" in lines[1]
  assert "_name" not in printed.stdout

  done = _sweep(cfg, root)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "4 runs to go" in done.stderr
  for f in ("results.md", "results.csv", "bars.png", "curves.png"):
    assert (root / f).stat().st_size > 0
  rows = list(csv.DictReader((root / "results.csv").read_text().splitlines()))
  assert [(r["setting"], r["seed"]) for r in rows] == [("lr=0.001", "0"), ("lr=0.001", "1"), ("sgd", "0"), ("sgd", "1")]
  assert all(r["steps"] == "6" and 0 <= float(r["final"]) <= 1 for r in rows)
  table = (root / "results.md").read_text()
  assert "| `sgd` | 2 |" in table and "python -m research.sweep" in table
  # Finished runs are skipped: a rerun trains nothing and rewrites the same table.
  again = _sweep(cfg, root)
  assert again.returncode == 0 and "0 runs to go" in again.stderr
  assert (root / "results.md").read_text() == table


def test_sweep_typo_is_named(tmp_path):
  cfg = tmp_path / "bad_sweep.py"
  cfg.write_text(CONFIG.replace('"optimizer.name": "sgd"', '"optimizer.nmae": "sgd"'))
  os.environ.setdefault("SWEEP_TEST_GLUE", "/nonexistent")
  with pytest.raises(KeyError, match=r"sweep\(\)\[1\] overrides unknown config key 'optimizer.nmae'"):
    sweep.load_sweep(str(cfg))
  # two settings that would run in one folder (the second would resume the first's checkpoint)
  cfg.write_text(CONFIG.replace('{"_name": "sgd", ', '{"_name": "lr=0.001", '))
  with pytest.raises(ValueError, match=r"sweep\(\)\[0\] and sweep\(\)\[1\] both run in 'lr=0.001'"):
    sweep.load_sweep(str(cfg))
  # seeds: a repeated one would count one run twice in the mean and std
  assert sweep.parse_seeds("0, 1,2") == [0, 1, 2]
  for bad, why in (("0,x", "comma-separated integers"), ("0,1,0", "distinct"), (",", "distinct")):
    with pytest.raises(ValueError, match=rf"--seeds='{bad}': expected .*{why}"):
      sweep.parse_seeds(bad)


def test_per_setting_config_arg_and_mixed_metrics(tmp_path):
  """configs/glue_table.py: each setting brings its own `task=...,model=...` argument, and the
  table names each row's metric when the tasks differ."""
  path = str(REPO / "configs" / "glue_table.py")
  settings, _ = sweep.load_sweep(path)
  names = [sweep.setting_name(s) for s in settings]
  assert {"cola-minilm", "sst2-minilm", "stsb-bow"} <= set(names)
  bow = settings[names.index("stsb-bow")]
  cmd = sweep.command(path, tmp_path, bow, 2)
  assert f"--config={path}:task=stsb,model=bow" in cmd and "--config.optimizer.lr=0.001" in cmd
  assert not any(c.startswith("--config._") for c in cmd)

  def row(setting, metric, final, best):
    return dict(setting=setting, seed=0, metric=metric, final=final, best=best, best_step=10, steps=20,
                train_seconds=1.0, trainable_params=10, total_params=10)  # fmt: skip

  rows = [row("cola-minilm", "matthews_corr", 0.4, 0.45), row("stsb-bow", "pearson", 0.2, 0.25)]
  rows.append(row("stsb-bow", "pearson", 0.3, 0.35) | {"seed": 1})
  text = sweep.write_tables(tmp_path, rows, [settings[0], bow], "GLUE", "cmd")
  # One seed shows its value alone (no spread to show); two, the mean ± the sample std.
  assert "| `cola-minilm` | matthews_corr | 1 | 40.0 | 45.0 |" in text
  assert "| `stsb-bow` | pearson | 2 | 25.0 ± 7.1 | 30.0 ± 7.1 |" in text
  assert "| setting | metric | seeds | final main metric |" in text


def test_curves_reads_splits_derives_perplexity_and_plots(tmp_path):
  from research import curves

  wd = tmp_path / "run"
  wd.mkdir()
  recs = [
    {"step": 10, "split": "train", "loss": 2.0, "accuracy": 0.1},
    {"step": 20, "split": "train", "loss": 1.0, "accuracy": 0.3},
    {"step": 20, "split": "val", "loss": 1.5, "perplexity": 4.4817, "accuracy": 0.2},
    {"step": 20, "split": "train", "loss": 0.5, "accuracy": 0.4},  # a resumed run re-logs step 20
  ]
  (wd / "metrics.jsonl").write_text("\n".join(map(json.dumps, recs)) + "\n")
  ppl = curves.read_curves(wd, "perplexity")
  assert ppl["val"] == ([20], [4.4817])
  assert ppl["train"][0] == [10, 20]
  assert ppl["train"][1] == pytest.approx([7.389056, 1.648721], rel=1e-5)  # exp(loss), last record wins
  out = tmp_path / "plots" / "curves.png"
  curves.plot([wd], ["loss", "accuracy", "perplexity"], out, logy=True)
  assert out.stat().st_size > 1000
  with pytest.raises(KeyError, match="grad_norm"):
    curves.plot([wd], ["grad_norm"], tmp_path / "x.png")
  (wd / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss"\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
    curves.read_curves(wd, "loss")


_RUN_CHILD = """
import signal, sys, time
from pathlib import Path
# As in a terminal: pytest-xdist's workers ignore SIGINT, and a child would inherit that.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {repo!r})
from research import sweep
run_dir = Path(sys.argv[1])
# A stand-in for research.main: on Ctrl-C it takes a moment to save, then exits cleanly.
run = ("import signal, sys, time, pathlib\\n"
       "d = pathlib.Path(sys.argv[1])\\n"
       "def save(*_): time.sleep(1); (d / 'saved').write_text('yes'); sys.exit(0)\\n"
       "signal.signal(signal.SIGINT, save)\\n"
       "(d / 'started').write_text('yes')\\n"
       "time.sleep(60)\\n")
sweep._run([sys.executable, "-c", run, str(run_dir)], run_dir)
"""


def test_ctrl_c_waits_for_the_run_to_save(tmp_path):
  """Ctrl-C reaches the sweep and its run (one process group): the sweep waits for the run's
  save instead of killing it, then stops with a message to rerun."""
  import signal
  import time

  child = subprocess.Popen(
    [sys.executable, "-c", _RUN_CHILD.format(repo=str(REPO)), str(tmp_path)],
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  deadline = time.time() + 60
  while not (tmp_path / "started").exists() and time.time() < deadline:
    time.sleep(0.1)
  os.killpg(child.pid, signal.SIGINT)
  _, err = child.communicate(timeout=60)
  assert (tmp_path / "saved").exists(), err  # not killed mid-save
  assert "waiting for the run to save" in err and "interrupted; rerun the sweep to resume" in err
  assert child.returncode == 1

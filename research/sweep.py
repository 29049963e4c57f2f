"""Run an ablation: a config's `sweep()` (a list of override dicts) times N seeds.

    python -m research.sweep --config configs/ablations/optimizers.py --workdir runs/ablations/optimizers
    python -m research.sweep --config ... --workdir ... --print_commands   # one launch line per run
    python -m research.sweep --config ... --workdir ... --aggregate_only   # tables and plots only

Each run is `python -m research.main` in its own process and workdir,
`WORKDIR/<setting>/seed_<s>`. A run with `summary.json` is finished and skipped, and an
interrupted one resumes from its checkpoint, so rerunning the command resumes the sweep.
The results are aggregated from each run's `summary.json` and `metrics.jsonl` into
`results.md`, `results.csv`, `bars.png` (mean +- std over seeds) and `curves.png` (the dev
metric per setting over training).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from research.curves import read_curves


def load_sweep(config_arg: str) -> tuple[list[dict], str]:
  """The override dicts of `sweep()` in the config file, and the file's docstring title."""
  path = config_arg.split(":", 1)[0]
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  if spec is None or not Path(path).is_file():
    raise FileNotFoundError(f"--config={config_arg}: no such file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise AttributeError(f"{path} defines no sweep(): an ablation config returns a list of override dicts")
  settings = module.sweep()
  default_arg = config_arg.split(":", 1)[1] if ":" in config_arg else None
  for i, s in enumerate(settings):  # typos fail before anything runs
    base = module.get_config(s.get("_arg", default_arg))
    for key in (k for k in s if not k.startswith("_")):
      node = base
      for part in key.split("."):
        if part not in node:
          raise KeyError(f"{path}: sweep()[{i}] overrides unknown config key {key!r}")
        node = node[part]
  seen = {}
  for i, s in enumerate(settings):  # each setting runs in WORKDIR/<its name>: two must not share one
    name = setting_name(s)
    if name in seen:
      raise ValueError(
        f'{path}: sweep()[{seen[name]}] and sweep()[{i}] both run in {name!r}; give one of them a "_name"'
      )
    seen[name] = i
  return settings, (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""


def setting_name(overrides: dict) -> str:
  """A readable, filesystem-safe name: "optimizer.name=sgd,optimizer.lr=0.1" -> "name=sgd,lr=0.1".

  An override dict may name itself with the key "_name", and may give its own config argument
  (the part after ":" in --config) with "_arg", e.g. {"_arg": "task=cola,model=bow"}."""
  if "_name" in overrides:
    return re.sub(r"[^A-Za-z0-9=.,_+-]", "_", str(overrides["_name"]))
  if not overrides:
    return "base"
  parts = [f"{k.split('.')[-1]}={_fmt_value(v)}" for k, v in overrides.items()]
  return re.sub(r"[^A-Za-z0-9=.,_+-]", "_", ",".join(parts))


def _fmt_value(v) -> str:
  if isinstance(v, (list, tuple)):
    return "+".join(map(str, v))
  return str(v)


def _flag_value(v) -> str:
  if isinstance(v, (list, tuple)):
    return "(" + ",".join(repr(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return str(v)


def command(config_arg: str, run_dir: Path, overrides: dict, seed: int) -> list[str]:
  if "_arg" in overrides:
    config_arg = f"{config_arg.split(':', 1)[0]}:{overrides['_arg']}"
  cmd = [sys.executable, "-m", "research.main", f"--config={config_arg}", f"--workdir={run_dir}"]
  cmd += [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items() if not k.startswith("_")]
  return cmd + [f"--config.seed={seed}", "--config.progress=false"]


# ---------------------------------------------------------------------------------------
# Aggregation.
# ---------------------------------------------------------------------------------------


def _mean_std(xs: list[float]) -> tuple[float, float]:
  m = sum(xs) / len(xs)
  return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _cell(xs: list[float]) -> str:
  """Mean ± std over seeds, or the one value: one seed has no spread to show."""
  m, s = _mean_std(xs)
  return f"{m:.1f} ± {s:.1f}" if len(xs) > 1 else f"{m:.1f}"


def _metric_name(run_dir: Path) -> str:
  cfg = json.loads((run_dir / "config.json").read_text())
  if cfg.get("best_metric"):
    return cfg["best_metric"]
  from research.data import tasks

  return tasks.get_task(cfg["task"]).metrics[0]


def collect(root: Path, settings: list[dict], seeds: list[int]) -> list[dict]:
  rows = []
  for s in settings:
    name = setting_name(s)
    for seed in seeds:
      run = root / name / f"seed_{seed}"
      if not (run / "summary.json").exists():
        continue
      summary = json.loads((run / "summary.json").read_text())
      metric = _metric_name(run)
      rows.append(
        {
          "setting": name,
          "seed": seed,
          "metric": metric,
          "final": summary["final"].get(metric, float("nan")),
          "best": summary.get("best", {}).get(metric, float("nan")),
          "best_step": summary.get("best_step"),
          "steps": summary["step"],
          "train_seconds": round(summary["train_seconds"], 1),
          "trainable_params": summary.get("trainable_params", 0),
          "total_params": summary.get("total_params", 0),
        }
      )
  return rows


MIXED = "main metric"


def _metric_label(rows: list[dict]) -> str:
  """The runs' metric, or MIXED when settings are scored on different metrics."""
  metrics = {r["metric"] for r in rows}
  return rows[0]["metric"] if len(metrics) == 1 else MIXED


def write_tables(root: Path, rows: list[dict], settings: list[dict], title: str, cmd: str) -> str:
  with open(root / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  metric = _metric_label(rows)
  mixed = metric == MIXED  # e.g. a GLUE table: each task has its own metric, shown per row
  lines = [
    f"# {title or root.name}",
    "",
    f"Produced by `{cmd}`.",
    "",
    f"Dev {metric if mixed else f'`{metric}`'} x 100, mean ± std over seeds (one seed: its value). *final*: at the end of training "
    "(no selection on dev); *best*: the best of the periodic dev evals (selected on dev, so optimistic).",
    "",
    f"| setting |{' metric |' if mixed else ''} seeds | final {metric} | best {metric} | trainable params | steps "
    "| train time / run (median) |",
    "|---|---|---|---|---|---|---|" + ("---|" if mixed else ""),
  ]
  for s in settings:
    name = setting_name(s)
    mine = [r for r in rows if r["setting"] == name]
    if not mine:
      lines.append(f"| `{name}` |{' |' if mixed else ''} 0 | not run | | | | |")
      continue
    final, best = _cell([100 * r["final"] for r in mine]), _cell([100 * r["best"] for r in mine])
    tp, total = mine[0]["trainable_params"], mine[0]["total_params"]
    secs = sorted(r["train_seconds"] for r in mine)[len(mine) // 2]  # median: robust to a paused run
    metric_cell = f" {mine[0]['metric']} |" if mixed else ""
    lines.append(
      f"| `{name}` |{metric_cell} {len(mine)} | {final} | {best} | "
      f"{tp:,} ({100 * tp / max(total, 1):.1f}%) | {mine[0]['steps']} | {secs:.0f} s |"
    )
  text = "\n".join(lines) + "\n"
  (root / "results.md").write_text(text)
  return text


def plot(root: Path, rows: list[dict], settings: list[dict], seeds: list[int]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = [setting_name(s) for s in settings if any(r["setting"] == setting_name(s) for r in rows)]
  metric = _metric_label(rows)
  finals = [[100 * r["final"] for r in rows if r["setting"] == n] for n in names]
  stats = [_mean_std(xs) for xs in finals]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1), 3.6))
  ax.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color="#4C72B0")
  labels = [f"{n} ({len(xs)})" for n, xs in zip(names, finals)]  # settings may have run different seeds
  ax.set_xticks(range(len(names)), labels, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel(f"dev {metric} x 100 (final)")
  lo, hi = min(m - sd for m, sd in stats), max(m + sd for m, sd in stats)
  pad = max(0.5, 0.25 * (hi - lo))
  ax.set_ylim(lo - pad, hi + pad)  # zoomed to the results: settings differ by tenths, not tens
  ax.set_title(f"{root.name}: mean ± std over seeds\n(seed count in brackets)", fontsize=10)
  fig.tight_layout()
  fig.savefig(root / "bars.png", dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6.4, 3.8))
  for n in names:
    curves, run_metric = {}, next(r["metric"] for r in rows if r["setting"] == n)
    for seed in seeds:
      run = root / n / f"seed_{seed}"
      if not (run / "metrics.jsonl").exists():
        continue
      for step, value in zip(*read_curves(run, run_metric).get("dev", ([], []))):
        curves.setdefault(step, []).append(100 * value)
    xs = sorted(curves)
    ax.plot(xs, [sum(curves[x]) / len(curves[x]) for x in xs], marker="o", ms=3, label=n)
  ax.set_xlabel("step")
  ax.set_ylabel(f"dev {metric} x 100 (mean over seeds)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(root / "curves.png", dpi=120)
  plt.close(fig)


def parse_seeds(arg: str) -> list[int]:
  """`--seeds 0,1,2` -> [0, 1, 2]; a repeated seed would count one run twice in the tables."""
  try:
    seeds = [int(s) for s in arg.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--seeds={arg!r}: expected comma-separated integers, e.g. 0,1,2") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds={arg!r}: expected one or more distinct seeds, e.g. 0,1,2")
  return seeds


def _define_flags() -> None:
  """Flags exist only when this file is the program (other entry points define --config too)."""
  flags.DEFINE_string("config", None, "An ablation config: configs/ablations/<name>.py[:arg]")
  flags.DEFINE_string("workdir", None, "Root folder of the sweep's runs and results.")
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds; each setting runs once per seed.")
  flags.DEFINE_bool("print_commands", False, "Print one launch command per unfinished run and exit.")
  flags.DEFINE_bool("aggregate_only", False, "Only write the tables and plots from finished runs.")
  flags.mark_flags_as_required(["config", "workdir"])


def _run(cmd: list[str], run_dir: Path) -> int:
  """One run, its output appended to stdout.log. On Ctrl-C (which the run receives too, and
  answers by saving at its next step boundary) wait for it rather than kill it mid-save."""
  with open(run_dir / "stdout.log", "a") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    try:
      return proc.wait()
    except KeyboardInterrupt:
      print("Ctrl-C: waiting for the run to save its checkpoint (Ctrl-C again: kill it)", file=sys.stderr)
      try:
        proc.wait()
      except KeyboardInterrupt:
        proc.kill()
      raise SystemExit(f"interrupted; rerun the sweep to resume ({run_dir})") from None


def main(argv):
  del argv
  f = flags.FLAGS
  config_arg, root, seeds_arg = f.config, Path(f.workdir), f.seeds
  seeds = parse_seeds(seeds_arg)
  settings, title = load_sweep(config_arg)
  sweep_cmd = f"python -m research.sweep --config {config_arg} --workdir {root} --seeds {seeds_arg}"
  pending = [
    (s, seed)
    for s in settings
    for seed in seeds
    if not (root / setting_name(s) / f"seed_{seed}" / "summary.json").exists()
  ]
  if f.print_commands:
    for s, seed in pending:
      print(shlex.join(command(config_arg, root / setting_name(s) / f"seed_{seed}", s, seed)))
    return
  if not f.aggregate_only:
    root.mkdir(parents=True, exist_ok=True)
    print(f"{len(settings)} settings x {len(seeds)} seeds; {len(pending)} runs to go", file=sys.stderr)
    for i, (s, seed) in enumerate(pending, 1):
      run_dir = root / setting_name(s) / f"seed_{seed}"
      run_dir.mkdir(parents=True, exist_ok=True)
      t0 = time.perf_counter()
      print(f"[{i}/{len(pending)}] {setting_name(s)} seed {seed}", file=sys.stderr, flush=True)
      rc = _run(command(config_arg, run_dir, s, seed), run_dir)
      if rc != 0:
        raise SystemExit(f"run failed (exit {rc}); see {run_dir / 'stdout.log'}; rerun the sweep to resume")
      if not (run_dir / "summary.json").exists():  # it saved and exited early: SIGTERM or Ctrl-C
        raise SystemExit(f"run stopped before its end ({run_dir / 'stdout.log'}); rerun the sweep to resume")
      print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  rows = collect(root, settings, seeds)
  if not rows:
    raise SystemExit(f"{root}: no finished runs to aggregate")
  print(write_tables(root, rows, settings, title, sweep_cmd))
  plot(root, rows, settings, seeds)


if __name__ == "__main__":
  _define_flags()
  app.run(main)

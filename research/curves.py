"""Plot training curves from one or more workdirs' `metrics.jsonl` (train and eval splits).

    python -m research.curves --workdirs runs/mlm-small --metrics loss,accuracy,perplexity \
        --out benchmarks/results/mlm/curves.png

One panel per metric, one line per (workdir, split). `perplexity` is exp(loss) where a record
has a loss but no perplexity (the trainer logs perplexity for language-model evals only).
`--logy` puts the loss and perplexity panels on a log scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from absl import app, flags


def read_curves(workdir: Path, metric: str) -> dict[str, tuple[list[int], list[float]]]:
  """{split: (steps, values)} of `metric` in WORKDIR/metrics.jsonl (a restarted run's repeats: last wins)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path}: no metrics.jsonl (is {workdir} a training workdir?)")
  by_split: dict[str, dict[int, float]] = {}
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    value = rec.get(metric)
    if value is None and metric == "perplexity" and "loss" in rec:
      value = math.exp(min(rec["loss"], 50.0))
    if value is not None and "step" in rec and math.isfinite(value):
      by_split.setdefault(rec.get("split", "train"), {})[int(rec["step"])] = float(value)
  return {s: (sorted(v), [v[k] for k in sorted(v)]) for s, v in by_split.items()}


def plot(workdirs: list[Path], metrics: list[str], out: Path, logy: bool = False) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    drawn = 0
    for wd in workdirs:
      for split, (steps, values) in sorted(read_curves(wd, metric).items()):
        label = split if len(workdirs) == 1 else f"{wd.name} {split}"
        ax.plot(steps, values, marker="o" if split != "train" else None, ms=3, label=label)
        drawn += 1
    if not drawn:
      raise KeyError(f"no workdir logged {metric!r} (looked in {', '.join(map(str, workdirs))})")
    ax.set_xlabel("step")
    ax.set_title(metric, fontsize=10)
    if logy and metric in ("loss", "perplexity"):
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  f = flags.FLAGS
  plot([Path(w) for w in f.workdirs], [m for m in f.metrics if m], Path(f.out), f.logy)
  print(f"wrote {f.out}")


if __name__ == "__main__":
  flags.DEFINE_list("workdirs", None, "Training workdirs (each with metrics.jsonl).")
  flags.DEFINE_list("metrics", ["loss"], "Metrics to plot, one panel each.")
  flags.DEFINE_string("out", None, "Output image (.png).")
  flags.DEFINE_bool("logy", False, "Log scale for loss and perplexity.")
  flags.mark_flags_as_required(["workdirs", "out"])
  app.run(main)

"""XLA:CPU flags the trainer and the benchmarks set before JAX's backend starts."""

from __future__ import annotations

import os

# YNNPACK kernels for dots with the elementwise work XLA fuses into them, and for reductions:
# the 0.8M-parameter GPT step is 1.13x faster (benchmarks/xla_cpu_flags.py), the MiniLM step
# unchanged. `individual_dot` as well: without it XLA's float normalization counts a bf16 dot as
# unsupported and runs it in fp32, so `model.matmul_dtype=bfloat16` would buy nothing (0.36 s
# against 0.20 s per MiniLM 4 x 128 step with it, on an AMX host).
CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce,individual_dot"


def set_cpu_flags() -> None:
  """Adds CPU_FLAGS to XLA_FLAGS unless the user set the YNNPACK fusion types themselves."""
  if "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_FLAGS).strip()

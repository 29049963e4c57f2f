"""The dense (fully connected) layer every model here uses."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from research.models.bf16 import bf16_matmul


class Dense(nn.Module):
  """nn.Dense (the same parameters, initialization and outputs), computed as one 2-D matmul over
  the flattened leading dimensions: (B*L) x I times I x O.

  Why: nn.Dense contracts the last axis of a B x L x I input, so its weight gradient contracts
  two axes (B and L) of both x and the output gradient g. XLA canonicalizes that dot by
  transposing g into a fresh O x (B*L) copy (jax 0.12, XLA:CPU), one full pass over the largest
  activation gradient of every projection (mlp_in's 4096 x 1536 at MiniLM 32 x 128). Flattened
  first, the gradient is x^T g with both operands as they lie, and no copy is made: forward plus
  backward of a 32 x 128 x 384 -> 1536 projection 60 against 98 ms on CPU.

  `matmul_dtype="bfloat16"` (`model.matmul_dtype`): the matmul takes bf16 operands into an fp32
  result, forward and backward (`bf16.bf16_matmul`); the bias add and the output stay fp32."""

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxLxI):
    kernel_IxO = self.param("kernel", self.kernel_init, (x_BxLxI.shape[-1], self.features))
    x_MxI = x_BxLxI.reshape(-1, x_BxLxI.shape[-1])
    if self.matmul_dtype == "bfloat16":
      y_MxO = bf16_matmul(x_MxI, kernel_IxO)
    else:
      y_MxO = x_MxI.astype(self.dtype) @ kernel_IxO.astype(self.dtype)
    if self.use_bias:
      y_MxO = y_MxO + self.param("bias", nn.initializers.zeros, (self.features,)).astype(y_MxO.dtype)[None, :]
    return y_MxO.reshape(*x_BxLxI.shape[:-1], self.features)

"""bf16 matmul operands with fp32 results, forward and backward, for XLA:CPU's bf16 matrix units.

`model.matmul_dtype=bfloat16` (configs/common.py): BERT's dense layers (`dense.Dense`) use
`bf16_matmul`, the masked-LM decoder `bf16_matmul_nt`; every activation, norm and gradient stays
fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _bf16_dot(x_MxI, kernel_IxO, contract):
  return jax.lax.dot_general(
    x_MxI.astype(jnp.bfloat16),
    kernel_IxO.astype(jnp.bfloat16),
    (contract, ((), ())),
    preferred_element_type=jnp.float32,
  )


@jax.custom_vjp
def bf16_matmul(x_MxI, kernel_IxO):
  """x @ kernel with bf16 operands and an fp32 result; the backward pass multiplies in bf16 too
  (the output gradient rounded to bf16, fp32 results), as JAX's own transpose of a mixed dot
  would multiply fp32 by bf16, which XLA:CPU runs as an fp32 matmul.

  Why: XLA:CPU (jax 0.12) hands a bf16 x bf16 -> fp32 dot to YNNPACK, which uses the CPU's bf16
  matrix instructions (AMX, AVX512-BF16; ~4x the fp32 rate on an AMX host), only when its left
  operand is row-major with the contracting dimension last; otherwise it runs it in fp32. The
  weight gradient x^T g contracts x's first dimension, and XLA turns a transpose into a layout
  change rather than a copy, so the smaller of x^T and g^T is made physically by a matmul with
  the identity (exact: one product per output): x^T when I <= O, which XLA's CSE shares between
  the query, key and value projections of one input; else g^T, giving dw^T."""
  return _bf16_dot(x_MxI, kernel_IxO, ((1,), (0,)))


def _bf16_matmul_fwd(x_MxI, kernel_IxO):
  return bf16_matmul(x_MxI, kernel_IxO), (x_MxI.astype(jnp.bfloat16), kernel_IxO.astype(jnp.bfloat16))


def _bf16_transpose(a_MxK):
  """a^T, materialized row-major: identity (K x K) times a, contracting a's last dimension."""
  k = a_MxK.shape[1]
  eye_KxK = jax.lax.broadcasted_iota(jnp.int32, (k, k), 0) == jax.lax.broadcasted_iota(jnp.int32, (k, k), 1)
  return _bf16_dot(eye_KxK.astype(jnp.bfloat16), a_MxK, ((1,), (1,))).astype(jnp.bfloat16)


def _bf16_outer(a_MxA, b_MxB):
  """a^T b (A x B, contracting M) with bf16 operands: the smaller of a^T and b^T is materialized
  (see bf16_matmul). When that is b^T, the product is (b^T a)^T, and the barrier keeps XLA from
  folding that transpose of a bf16 -> fp32 dot's result into swapped operands, which YNNPACK
  refuses and whose fallback fails at run time (jax 0.12: "Unsupported element type for
  DotThunk::Execute: BF16 x BF16 = F32"). For mlp_out's weight gradient (I > O) 2.5x XLA's own
  fp32 dot at 4096 x 1536 x 384."""
  if a_MxA.shape[1] <= b_MxB.shape[1]:
    return _bf16_dot(_bf16_transpose(a_MxA), b_MxB, ((1,), (0,)))
  return jax.lax.optimization_barrier(_bf16_dot(_bf16_transpose(b_MxB), a_MxA, ((1,), (0,)))).T


def _bf16_matmul_bwd(res, g_MxO):
  x_MxI, kernel_IxO = res
  g = g_MxO.astype(jnp.bfloat16)
  return _bf16_dot(g, kernel_IxO, ((1,), (1,))), _bf16_outer(x_MxI, g)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


@jax.custom_vjp
def bf16_matmul_nt(x_MxI, w_OxI):
  """x @ w^T with bf16 operands and an fp32 result, forward and backward, as `bf16_matmul`; for a
  weight stored output-major (the masked-LM decoder's tied word embeddings, V x H)."""
  return _bf16_dot(x_MxI, w_OxI, ((1,), (1,)))


def _bf16_matmul_nt_fwd(x_MxI, w_OxI):
  return bf16_matmul_nt(x_MxI, w_OxI), (x_MxI.astype(jnp.bfloat16), w_OxI.astype(jnp.bfloat16))


def _bf16_matmul_nt_bwd(res, g_MxO):
  x_MxI, w_OxI = res
  g = g_MxO.astype(jnp.bfloat16)
  return _bf16_dot(g, w_OxI, ((1,), (0,))), _bf16_outer(g, x_MxI)


bf16_matmul_nt.defvjp(_bf16_matmul_nt_fwd, _bf16_matmul_nt_bwd)

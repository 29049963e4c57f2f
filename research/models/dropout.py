"""Dropout with 16-bit draws, from JAX's PRNG or from a keyed counter hash.

`flax.linen.Dropout` draws a 32-bit uniform per element through `jax.random.bernoulli`. On a
CPU the random bits are a large share of a BERT train step (the attention-probability masks
alone are B x N x L x L per layer): in a MiniLM 32 x 128 step they took ~250 ms of 1.34 s
(`jax.profiler`, 2026-11-24). Two ways to make them cheaper, chosen by `bits`:

- "jax" (the default): each 32-bit word of `jax.random.bits` gives two 16-bit draws, so half
  as many words are drawn and the mask kept for the backward pass is one byte per element.
  XLA:CPU fuses the hash into each half's comparison, so each word is still hashed twice, the
  hashing of a word per element; computing the words once, behind an optimization barrier, made
  the MiniLM 32 x 128 step 2% slower (benchmarks/results/PERFORMANCE.md, "Compile time"). The
  step is still 8% faster than with `nn.Dropout`'s `bernoulli` draws (1.01 against 1.10 s on the
  Intel AMX host, 2026-12-04): the draws are compared as integers, with no float uniform made.
- "hash": no bit array at all. Each element's draw is a keyed hash of its flat index (two
  words taken from the key, each mixed in by a round of Wellons' low-bias 32-bit integer
  hash), which XLA computes inside the fusion that applies the mask, so the draws are never
  written to memory and the rng call per layer disappears (on the CPU the attention masks'
  rng_bit_generator call and the copy after it were ~12% of the MiniLM step). The draws are a
  function of the key and the element's position in the global array, so they do not depend
  on how the array is sharded (an array of 2^32 elements or more takes the "jax" draws). The
  hash is statistically sound for dropout (tested: rate, uniformity, neighbouring elements,
  steps and seeds), not a cryptographic generator.

Either way an element is dropped when its draw is below round(rate * 2^16), and the kept ones
are scaled by 2^16 / (2^16 - that threshold), the exact inverse of the keep probability, so the
layer is unbiased; the rate itself is rounded to a multiple of 2^-16 (0.1 -> 0.100006).

Same interface as `nn.Dropout` (the "dropout" rng collection, `deterministic`), so the rng
plumbing (fold_in(rng, step)), sharding and exact resume are unchanged.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

BITS = 16
LEVELS = 1 << BITS
IMPLS = ("jax", "hash")


def _mix(h: jax.Array) -> jax.Array:
  """A bijection of uint32 with low avalanche bias (C. Wellons' hash-prospector, "lowbias32")."""
  h = (h ^ (h >> 16)) * jnp.uint32(0x21F0AAAD)
  h = (h ^ (h >> 15)) * jnp.uint32(0xD35A2D97)
  return h ^ (h >> 15)


def _hash_draws(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """16-bit draws (uint32 in [0, 2^16)) for every element of `shape`: the high half of
  mix(mix(index + k0) ^ k1), with (k0, k1) from the key."""
  k = jax.random.bits(rng, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  return _mix(_mix(index + k[0]) ^ k[1]) >> BITS


def dropout(x: jax.Array, rate: float, rng: jax.Array, bits: str = "jax") -> jax.Array:
  """Zero each element with probability `rate` (rounded to a multiple of 2^-16), scale the rest."""
  threshold = round(rate * LEVELS)
  if threshold <= 0:
    return x
  if threshold >= LEVELS:
    return jnp.zeros_like(x)
  if bits not in IMPLS:
    raise ValueError(f"dropout bits={bits!r}: expected one of {', '.join(IMPLS)}")
  scale = jnp.asarray(LEVELS / (LEVELS - threshold), x.dtype)
  if bits == "hash" and x.size < 2**32:  # the index is uint32; larger arrays take the "jax" draws
    return jnp.where(_hash_draws(rng, x.shape) >= threshold, x * scale, jnp.zeros((), x.dtype))
  *lead, n = x.shape
  # Two draws per word: the low halves decide the first ceil(n/2) elements of the last axis,
  # the high halves the rest (comparing before the concatenation keeps the saved mask boolean).
  words = jax.random.bits(rng, (*lead, (n + 1) // 2), jnp.uint32)
  keep = jnp.concatenate([(words & (LEVELS - 1)) >= threshold, (words >> BITS) >= threshold], axis=-1)
  return jnp.where(keep[..., :n], x * scale, jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """`nn.Dropout` (rng collection "dropout") with 16-bit draws; see the module docstring."""

  rate: float
  bits: str = "jax"  # "jax" | "hash"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"), self.bits)

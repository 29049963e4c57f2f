"""A decoder-only transformer (GPT) in Flax Linen: pre-LN, tied embeddings, causal mask,
learned or rotary positions, and a KV cache for generation.

    logits_BxLxV = GPT(cfg).apply({"params": p}, ids_BxL)                       # training
    logits_BxTxV, cache = GPT(cfg).apply({"params": p}, ids_BxT, cache, start,  # decoding
                                         method=GPT.decode)

The cache holds every layer's keys and values for `cache_len` positions; `decode` writes
the T new positions at `start` and attends to everything before them, so each generated
token costs one position, not the whole prefix. Shapes are in names: B batch, L/T length,
H hidden, N heads, D head size, V vocabulary, S cache length.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.bert import gelu
from research.models.dense import Dense
from research.models.dropout import Dropout


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int = 50304
  block_size: int = 1024  # longest sequence (learned positions have this many rows)
  num_layers: int = 12
  num_heads: int = 12
  hidden_size: int = 768
  mlp_ratio: int = 4
  dropout: float = 0.0
  bias: bool = False  # nanoGPT: no biases in Linear/LayerNorm is a bit better and faster
  positions: str = "learned"  # learned | rope
  rope_base: float = 10000.0
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-5
  remat: bool = False  # recompute each block's activations in the backward pass (less memory)
  dropout_bits: str = "jax"  # "jax" | "hash": see research/models/dropout.py

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


Cache = list[dict[str, jax.Array]]  # per layer: {"k": BxSxNxD, "v": BxSxNxD}


def init_cache(cfg: GPTConfig, batch: int, cache_len: int, dtype=jnp.float32) -> Cache:
  d = cfg.hidden_size // cfg.num_heads
  shape = (batch, cache_len, cfg.num_heads, d)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)]


def rope(x_BxTxNxD: jax.Array, pos_T: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotating pairs (i, i + D/2)."""
  d = x_BxTxNxD.shape[-1]
  inv_freq = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angles_Tx1xD2 = (pos_T.astype(jnp.float32)[:, None] * inv_freq[None, :])[:, None, :]
  cos, sin = jnp.cos(angles_Tx1xD2)[None], jnp.sin(angles_Tx1xD2)[None]
  x1, x2 = jnp.split(x_BxTxNxD.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxNxD.dtype)


def _dense(cfg: GPTConfig, features: int, name: str, dtype, residual: bool = False) -> Dense:
  """A projection with GPT-2 init; `residual` ones (into the residual stream) get std / sqrt(2 * layers)."""
  std = cfg.initializer_range / ((2 * cfg.num_layers) ** 0.5 if residual else 1.0)
  return Dense(features, use_bias=cfg.bias, dtype=dtype, kernel_init=nn.initializers.normal(std), name=name)


class CausalSelfAttention(nn.Module):
  cfg: GPTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxH, pos_T, kv: dict | None, start, *, train: bool):
    cfg = self.cfg
    n, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    b, t, _ = x_BxTxH.shape
    qkv = _dense(cfg, 3 * cfg.hidden_size, "qkv", self.dtype)(x_BxTxH)
    q_BxTxNxD, k_BxTxNxD, v_BxTxNxD = (z.reshape(b, t, n, d) for z in jnp.split(qkv, 3, axis=-1))
    if cfg.positions == "rope":
      q_BxTxNxD, k_BxTxNxD = rope(q_BxTxNxD, pos_T, cfg.rope_base), rope(k_BxTxNxD, pos_T, cfg.rope_base)
    if kv is None:  # training / full forward: keys are this sequence
      keys, values, key_pos = k_BxTxNxD, v_BxTxNxD, pos_T
      new_kv = None
    else:  # decoding: write the new positions into the cache, attend to all of it
      keys = jax.lax.dynamic_update_slice(kv["k"], k_BxTxNxD.astype(kv["k"].dtype), (0, start, 0, 0))
      values = jax.lax.dynamic_update_slice(kv["v"], v_BxTxNxD.astype(kv["v"].dtype), (0, start, 0, 0))
      key_pos = jnp.arange(keys.shape[1])
      new_kv = {"k": keys, "v": values}
    # Causal: a query at position p sees keys at positions <= p (cache slots past the
    # newest token are never seen).
    allowed_TxS = key_pos[None, :] <= pos_T[:, None]
    scores_BxNxTxS = jnp.einsum("btnd,bsnd->bnts", q_BxTxNxD, keys.astype(self.dtype)) / jnp.sqrt(d).astype(self.dtype)
    scores_BxNxTxS = jnp.where(allowed_TxS[None, None], scores_BxNxTxS.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = Dropout(cfg.dropout, cfg.dropout_bits)(jax.nn.softmax(scores_BxNxTxS, axis=-1), deterministic=not train)
    ctx_BxTxNxD = jnp.einsum("bnts,bsnd->btnd", probs.astype(self.dtype), values.astype(self.dtype))
    out = _dense(cfg, cfg.hidden_size, "out", self.dtype, residual=True)(ctx_BxTxNxD.reshape(b, t, n * d))
    return Dropout(cfg.dropout, cfg.dropout_bits)(out, deterministic=not train), new_kv


class Block(nn.Module):
  """x + attn(LN(x)); x + mlp(LN(x))."""

  cfg: GPTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxH, pos_T, kv, start, train: bool):
    cfg = self.cfg
    norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, use_bias=cfg.bias, dtype=jnp.float32, name=name)  # noqa: E731
    a, new_kv = CausalSelfAttention(cfg, self.dtype, name="attn")(
      norm("attn_norm")(x_BxTxH), pos_T, kv, start, train=train
    )
    x_BxTxH = x_BxTxH + a
    h = _dense(cfg, cfg.mlp_ratio * cfg.hidden_size, "mlp_in", self.dtype)(norm("mlp_norm")(x_BxTxH))
    h = _dense(cfg, cfg.hidden_size, "mlp_out", self.dtype, residual=True)(gelu(h))
    return x_BxTxH + Dropout(cfg.dropout, cfg.dropout_bits)(h, deterministic=not train), new_kv


class GPT(nn.Module):
  cfg: GPTConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.cfg
    init = nn.initializers.normal(cfg.initializer_range)
    self.token_embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init)
    if cfg.positions == "learned":
      self.position_embed = nn.Embed(cfg.block_size, cfg.hidden_size, embedding_init=init)
    elif cfg.positions != "rope":
      raise ValueError(f"positions={cfg.positions!r}: expected 'learned' or 'rope'")
    block = nn.remat(Block, static_argnums=(5,)) if cfg.remat else Block  # train is static
    self.blocks = [block(cfg, self.dtype, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = nn.LayerNorm(cfg.layer_norm_eps, use_bias=cfg.bias, dtype=jnp.float32)
    self.drop = Dropout(cfg.dropout, cfg.dropout_bits)

  def _run(self, ids_BxT, pos_T, cache: Cache | None, start, train: bool):
    x = self.token_embed(ids_BxT)
    if self.cfg.positions == "learned":
      x = x + self.position_embed(pos_T)[None]
    x = self.drop(x, deterministic=not train).astype(self.dtype)
    new_cache = []
    for i, block in enumerate(self.blocks):
      x, kv = block(x, pos_T, None if cache is None else cache[i], start, train)
      new_cache.append(kv)
    x = self.final_norm(x)
    # Tied output layer: logits = x E^T (fp32 for the softmax), one 2-D matmul over the flattened
    # positions so that E's gradient is not a transposed copy of the logits' (see `Dense`).
    b, t, h = x.shape
    logits_BxTxV = self.token_embed.attend(x.reshape(b * t, h).astype(jnp.float32)).reshape(b, t, -1)
    return logits_BxTxV, new_cache

  def __call__(self, input_ids_BxL, *, train: bool = False):
    t = input_ids_BxL.shape[1]
    if t > self.cfg.block_size:
      raise ValueError(f"sequence length {t} > block_size {self.cfg.block_size}")
    return self._run(input_ids_BxL, jnp.arange(t), None, 0, train)[0]

  def decode(self, ids_BxT, cache: Cache, start):
    """Logits of T new tokens at positions start..start+T-1, and the updated cache."""
    pos_T = start + jnp.arange(ids_BxT.shape[1])
    return self._run(ids_BxT, pos_T, cache, start, train=False)

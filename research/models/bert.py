"""BERT in Flax Linen: embeddings, post-LN encoder, pooler, and task heads.

Read top to bottom; there are no framework layers. Shapes are in names:
B batch, L sequence length, H hidden size, N heads, D head size, C classes.

The parameter tree uses our own short names; `convert.py` maps them to
Hugging Face names explicitly, in both directions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.bf16 import bf16_matmul_nt
from research.models.dense import Dense
from research.models.dropout import Dropout


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture hyperparameters; field names follow HF `config.json`."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  # LoRA (Hu et al. 2021) on the named projections; 0 = off. Not part of HF's config:
  # `finetune.merge_lora` folds the adapters into the kernels for export and inference.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("query", "value")
  # Rematerialization: recompute each layer's activations in the backward pass instead of
  # keeping them (less memory, ~1/3 more compute). Not part of HF's config either.
  remat: bool = False
  # Attention kernel: "einsum" (softmax written out, with attention-probability dropout) or
  # jax.nn.dot_product_attention: "xla", "cudnn" (fused flash attention on NVIDIA GPUs) or
  # "auto" (JAX picks). The fused ones have no attention-probability dropout, so they need
  # attention_probs_dropout_prob = 0 (checked by the trainer). Not part of HF's config.
  attention: str = "einsum"
  # Dropout's random draws: "jax" (jax.random.bits) or "hash" (a keyed hash of each element's
  # index, computed where the mask is applied; faster on CPU), see research/models/dropout.py.
  dropout_bits: str = "jax"
  # The dense layers' matmul operands: "float32", or "bfloat16" (bf16 operands, fp32 accumulation
  # and output, in the backward pass too; every other op, and LoRA-adapted projections, stay in
  # the model's dtype). Not part of HF's config; see `bf16_matmul`.
  matmul_dtype: str = "float32"

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> BertConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    if "lora_targets" in kw:  # a list once it has been through JSON
      kw["lora_targets"] = tuple(kw["lora_targets"])
    return cls(**kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def without_lora(self) -> BertConfig:
    return dataclasses.replace(self, lora_rank=0)


FUSED_ATTENTION = {"xla": "xla", "cudnn": "cudnn", "auto": None}  # jax.nn.dot_product_attention(implementation=)


def gelu(x):
  """Exact GELU as PyTorch computes it, x/2 (1 + erf(x / sqrt 2)). jax.nn.gelu(approximate=False)
  goes through erfc, which XLA:CPU evaluates ~3x slower (1.26 against 0.42 ms forward on a
  4 x 128 x 1536 block); the two differ by < 1e-6 absolutely."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


# HF's "gelu" is the exact erf form; "gelu_new"/"gelu_pytorch_tanh" the tanh one.
_ACTIVATIONS = {
  "gelu": gelu,
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
}


class LoraDense(nn.Module):
  """y = x W + b + (alpha / r) (x A) B: W frozen, A (in x r) and B (r x out) trained.

  B starts at zero, so training starts from the pretrained function. The parameters sit
  beside `kernel`/`bias` at the same path, so pretrained weights load unchanged.
  """

  features: int
  rank: int
  alpha: float
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x_BxLxI):
    fan_in = x_BxLxI.shape[-1]
    kernel_IxO = self.param("kernel", self.kernel_init, (fan_in, self.features))
    bias_O = self.param("bias", nn.initializers.zeros, (self.features,))
    a_IxR = self.param("lora_a", nn.initializers.normal(1.0 / fan_in**0.5), (fan_in, self.rank))
    b_RxO = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
    x = x_BxLxI.reshape(-1, fan_in).astype(self.dtype)  # 2-D, as in `Dense`
    y = x @ kernel_IxO.astype(self.dtype) + bias_O.astype(self.dtype)[None, :]
    y = y + (self.alpha / self.rank) * ((x @ a_IxR.astype(self.dtype)) @ b_RxO.astype(self.dtype))
    return y.reshape(*x_BxLxI.shape[:-1], self.features)


def _dense(features: int, cfg: BertConfig, dtype: Any, name: str) -> nn.Module:
  init = nn.initializers.normal(cfg.initializer_range)
  if cfg.lora_rank and name in cfg.lora_targets:
    return LoraDense(features, cfg.lora_rank, cfg.lora_alpha, dtype=dtype, kernel_init=init, name=name)
  return Dense(features, dtype=dtype, kernel_init=init, matmul_dtype=cfg.matmul_dtype, name=name)


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
  # Norms run in fp32 whatever the compute dtype: bf16 variance loses digits.
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name=name)


class SelfAttention(nn.Module):
  """Multi-head self-attention. Keys and values come from every token of `x`; queries from
  `queries_BxQxH` when given (the last layer of a [CLS] classifier, see BertEncoder), else from
  `x` itself (Q = L)."""

  cfg: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxH, bias_Bx1xQxL, *, train: bool, queries_BxQxH=None):
    cfg = self.cfg
    n = cfg.num_attention_heads
    d = cfg.hidden_size // n
    q_in_BxQxH = x_BxLxH if queries_BxQxH is None else queries_BxQxH
    b, nq = q_in_BxQxH.shape[:2]

    def heads(name, inputs):
      return _dense(cfg.hidden_size, cfg, self.dtype, name)(inputs).reshape(b, inputs.shape[1], n, d)

    q_BxQxNxD = heads("query", q_in_BxQxH)
    k_BxLxNxD, v_BxLxNxD = heads("key", x_BxLxH), heads("value", x_BxLxH)
    if cfg.attention != "einsum":  # the boolean mask is bias == 0
      ctx_BxQxNxD = jax.nn.dot_product_attention(
        q_BxQxNxD, k_BxLxNxD, v_BxLxNxD, mask=bias_Bx1xQxL == 0, implementation=FUSED_ATTENTION[cfg.attention]
      )
      return _dense(cfg.hidden_size, cfg, self.dtype, "out")(ctx_BxQxNxD.reshape(b, nq, n * d))
    scores_BxNxQxL = jnp.einsum("bqnd,bknd->bnqk", q_BxQxNxD, k_BxLxNxD) / jnp.sqrt(d).astype(self.dtype)
    # Softmax in fp32 (the masked bias is finfo.min, and exp() of bf16 scores is coarse), with its
    # normalization after the value matmul: dropout(e / sum) @ v = (dropout(e) @ v) / sum, as
    # flash attention does. The division then runs over BxQxNxD, not BxNxQxL, and no row-sum is
    # broadcast to BxNxQxL (~10% of this block's forward + backward time on CPU, 4 x 128).
    logits_BxNxQxL = scores_BxNxQxL.astype(jnp.float32) + bias_Bx1xQxL
    e_BxNxQxL = jnp.exp(logits_BxNxQxL - jax.lax.stop_gradient(logits_BxNxQxL.max(-1, keepdims=True)))
    sum_BxQxNx1 = e_BxNxQxL.sum(-1).transpose(0, 2, 1)[..., None]
    e_BxNxQxL = Dropout(cfg.attention_probs_dropout_prob, cfg.dropout_bits)(e_BxNxQxL, deterministic=not train)
    ctx_BxQxNxD = jnp.einsum("bnqk,bknd->bqnd", e_BxNxQxL.astype(self.dtype), v_BxLxNxD) / sum_BxQxNx1
    return _dense(cfg.hidden_size, cfg, self.dtype, "out")(ctx_BxQxNxD.astype(self.dtype).reshape(b, nq, n * d))


class Layer(nn.Module):
  """One post-LN transformer layer, as in the original BERT. With `queries_BxQxH` it computes
  only those positions' outputs (BxQxH), attending over all of `x`."""

  cfg: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxH, bias_Bx1xQxL, train: bool, queries_BxQxH=None):
    cfg = self.cfg
    drop = Dropout(cfg.hidden_dropout_prob, cfg.dropout_bits)
    attn = SelfAttention(cfg, self.dtype, name="attn")(x_BxLxH, bias_Bx1xQxL, train=train, queries_BxQxH=queries_BxQxH)
    residual = x_BxLxH if queries_BxQxH is None else queries_BxQxH
    x = _layer_norm(cfg, "attn_norm")(residual + drop(attn, deterministic=not train))
    h = _dense(cfg.intermediate_size, cfg, self.dtype, "mlp_in")(x)
    h = _dense(cfg.hidden_size, cfg, self.dtype, "mlp_out")(_ACTIVATIONS[cfg.hidden_act](h))
    return _layer_norm(cfg, "mlp_norm")(x + drop(h, deterministic=not train))


class BertEncoder(nn.Module):
  """Returns (hidden states BxLxH, pooled [CLS] BxH).

  Packed rows (`positions_BxL` given, see `pipeline.TrainIterator(pack_rows=...)`): each row
  holds several examples; `attention_mask_BxL` then numbers them 1..S per row (0 = padding),
  attention stays inside each example (a block-diagonal mask), positions restart at each
  example, and the pooled output is per example: BxSxH, S = `num_segments`.

  `cls_only=True` runs the last layer for the [CLS] queries alone (keys and values still come
  from every token), for a head that reads nothing else: the other tokens' last-layer outputs
  would be computed and thrown away (~1/L of the encoder's work). The first output is then
  the last layer's [CLS] rows (Bx1xH, or BxSxH packed), not every token's hidden state.
  `query_positions_BxP` does the same for the P positions per row a masked-LM head reads: the
  first output is then BxPxH, the last layer at those positions, and the pooled output None.
  """

  cfg: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    input_ids_BxL,
    attention_mask_BxL,
    token_type_ids_BxL,
    positions_BxL=None,
    num_segments=0,
    *,
    train: bool,
    cls_only: bool = False,
    query_positions_BxP=None,
  ):
    cfg = self.cfg
    init = nn.initializers.normal(cfg.initializer_range)
    _, seq = input_ids_BxL.shape
    if seq > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {seq} > max_position_embeddings {cfg.max_position_embeddings}")
    packed = positions_BxL is not None
    # "token_rows": where steps.train_step can take the word embeddings' gradient as rows
    # (a no-op unless a "perturbations" collection is passed; BertClassifier.row_sparse_table).
    x_BxLxH = (
      self.perturb(
        "token_rows", nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="token_embed")(input_ids_BxL)
      )
      + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, name="position_embed")(
        positions_BxL if packed else jnp.arange(seq)[None, :]
      )
      + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, name="type_embed")(token_type_ids_BxL)
    )
    x_BxLxH = _layer_norm(cfg, "embed_norm")(x_BxLxH)
    x_BxLxH = Dropout(cfg.hidden_dropout_prob, cfg.dropout_bits)(x_BxLxH, deterministic=not train).astype(self.dtype)

    # Additive mask: 0 where attended, the most negative float where padded (or, packed,
    # where query and key belong to different examples).
    if packed:
      seg_BxL = attention_mask_BxL
      keep_Bx1xLxL = ((seg_BxL[:, :, None] == seg_BxL[:, None, :]) & (seg_BxL[:, None, :] > 0))[:, None]
    else:
      keep_Bx1xLxL = attention_mask_BxL[:, None, None, :].astype(bool)  # Bx1x1xL, broadcast over queries
    bias = jnp.where(keep_Bx1xLxL, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    layer = nn.remat(Layer, static_argnums=(3,)) if cfg.remat else Layer  # train is static
    last = cfg.num_hidden_layers - 1
    for i in range(last if cls_only or query_positions_BxP is not None else cfg.num_hidden_layers):
      x_BxLxH = layer(cfg, self.dtype, name=f"layer_{i}")(x_BxLxH, bias, train)
    if query_positions_BxP is not None:  # the last layer at those positions alone, attending over every token
      if packed:
        raise ValueError("query_positions_BxP is for unpacked rows (masked-LM batches)")
      queries_BxPxH = jnp.take_along_axis(x_BxLxH, query_positions_BxP[..., None], axis=1)
      out_BxPxH = layer(cfg, self.dtype, name=f"layer_{last}")(x_BxLxH, bias, train, queries_BxPxH)
      if self.is_initializing():  # the same parameters as the full path
        _dense(cfg.hidden_size, cfg, self.dtype, "pooler")(out_BxPxH[:, 0])
      return out_BxPxH, None

    # Each example's [CLS] (its first token): BxH, or packed BxSxH.
    if packed:
      onehot_BxSxL = segment_onehot(seg_BxL, num_segments)
      first_BxSxL = onehot_BxSxL & (positions_BxL[:, None, :] == 0)
      cls = jnp.einsum("bsl,blh->bsh", first_BxSxL.astype(x_BxLxH.dtype), x_BxLxH)
    else:
      cls = x_BxLxH[:, :1]
    if cls_only:  # the last layer at the [CLS] positions alone, attending over every token
      if packed:  # query s attends to its own example's tokens
        bias = jnp.where(onehot_BxSxL[:, None], 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
      cls = layer(cfg, self.dtype, name=f"layer_{last}")(x_BxLxH, bias, train, cls)
      x_BxLxH = cls
    cls = cls if packed else cls[:, 0]
    pooled = jnp.tanh(_dense(cfg.hidden_size, cfg, self.dtype, "pooler")(cls))
    return x_BxLxH, pooled


class BertClassifier(nn.Module):
  """Sequence classification (C = num classes) or regression (C = 1).

  `pooling="cls"` is BERT's (and HF `BertForSequenceClassification`'s): tanh(dense([CLS])).
  `pooling="mean"` averages the real tokens' hidden states, which is what sentence-embedding
  checkpoints such as all-MiniLM-L6-v2 were trained to make meaningful; their pooler is not.
  On packed rows (see BertEncoder) the logits are per example slot, (B*S)xC, row-major.
  With `pooling="cls"` and `last_layer_cls_only` (the default) the last layer runs for the
  [CLS] tokens alone (BertEncoder's `cls_only`): the same logits for ~1/L less work.
  The word embeddings are only looked up (no tied output layer), so the trainer may take their
  gradient as the looked-up rows (`row_sparse_table`, at the perturbation `row_sparse_rows`).
  """

  row_sparse_table = ("bert", "token_embed", "embedding")
  row_sparse_rows = ("bert", "token_rows")

  cfg: BertConfig
  num_labels: int
  dtype: Any = jnp.float32
  pooling: str = "cls"
  last_layer_cls_only: bool = True

  @nn.compact
  def __call__(
    self, input_ids_BxL, attention_mask_BxL, token_type_ids_BxL, positions_BxL=None, num_segments=0, *, train=False
  ):
    cls_only = self.pooling == "cls" and self.last_layer_cls_only
    hidden_BxLxH, pooled = BertEncoder(self.cfg, self.dtype, name="bert")(
      input_ids_BxL, attention_mask_BxL, token_type_ids_BxL, positions_BxL, num_segments, train=train, cls_only=cls_only
    )
    if self.pooling == "mean":
      if positions_BxL is None:
        pooled = mean_pool(hidden_BxLxH.astype(jnp.float32), attention_mask_BxL).astype(self.dtype)
      else:
        onehot_BxSxL = segment_onehot(attention_mask_BxL, num_segments).astype(jnp.float32)
        sums_BxSxH = jnp.einsum("bsl,blh->bsh", onehot_BxSxL, hidden_BxLxH.astype(jnp.float32))
        pooled = (sums_BxSxH / jnp.maximum(onehot_BxSxL.sum(-1, keepdims=True), 1e-9)).astype(self.dtype)
    elif self.pooling != "cls":
      raise ValueError(f"pooling={self.pooling!r}: expected 'cls' or 'mean'")
    pooled = Dropout(self.cfg.hidden_dropout_prob, self.cfg.dropout_bits)(pooled, deterministic=not train)
    logits = _dense(self.num_labels, self.cfg, self.dtype, "classifier")(pooled).astype(jnp.float32)
    return logits.reshape(-1, self.num_labels)  # BxC, or (B*S)xC packed


def segment_onehot(segments_BxL: jax.Array, num_segments: int) -> jax.Array:
  """BxSxL bools: token l of row b belongs to example s + 1 of that row."""
  return segments_BxL[:, None, :] == jnp.arange(1, num_segments + 1, dtype=segments_BxL.dtype)[None, :, None]


def mean_pool(hidden_BxLxH: jax.Array, attention_mask_BxL: jax.Array) -> jax.Array:
  """Sentence embedding as sentence-transformers computes it: mean over real tokens."""
  m_BxLx1 = attention_mask_BxL[..., None].astype(hidden_BxLxH.dtype)
  return (hidden_BxLxH * m_BxLx1).sum(1) / jnp.maximum(m_BxLx1.sum(1), 1e-9)


class BertForMaskedLM(nn.Module):
  """Masked-LM pretraining: encoder -> dense + act + LayerNorm -> logits over the vocabulary,
  with the decoder tied to the word embeddings (plus a bias), as HF `BertForMaskedLM`.

  Given `masked_positions`, `last_layer_masked_only` (the default) runs the last layer for
  those positions alone (BertEncoder's `query_positions_BxP`): the same logits for ~(1 - P/L)
  of one layer's work less. In training only the last layer's dropout draws differ, as their
  shape is BxPxH instead of BxLxH."""

  cfg: BertConfig
  dtype: Any = jnp.float32
  last_layer_masked_only: bool = True

  @nn.compact
  def __call__(
    self, input_ids_BxL, attention_mask_BxL, token_type_ids_BxL, masked_positions_BxP=None, *, train: bool = False
  ):
    """Logits BxPxV at `masked_positions` (BxLxV at every position when None)."""
    cfg = self.cfg
    queries = masked_positions_BxP if self.last_layer_masked_only else None
    hidden_BxLxH, _ = BertEncoder(cfg, self.dtype, name="bert")(
      input_ids_BxL, attention_mask_BxL, token_type_ids_BxL, train=train, query_positions_BxP=queries
    )
    if masked_positions_BxP is not None and queries is None:
      hidden_BxLxH = jnp.take_along_axis(hidden_BxLxH, masked_positions_BxP[..., None], axis=1)
    h = _dense(cfg.hidden_size, cfg, self.dtype, "mlm_dense")(hidden_BxLxH)
    h = _layer_norm(cfg, "mlm_norm")(_ACTIVATIONS[cfg.hidden_act](h))
    embedding_VxH = self.variables["params"]["bert"]["token_embed"]["embedding"]
    bias_V = self.param("mlm_bias", nn.initializers.zeros, (cfg.vocab_size,))
    # One 2-D matmul over the flattened positions, for the reason in `Dense`: the tied embeddings'
    # gradient is then g^T h as both lie, not a transposed copy of the BxPxV logits' gradient.
    b, p = h.shape[:2]
    h_MxH = h.reshape(b * p, -1).astype(jnp.float32)
    if cfg.matmul_dtype == "bfloat16":
      logits_MxV = bf16_matmul_nt(h_MxH, embedding_VxH)
    else:
      logits_MxV = jax.lax.dot_general(h_MxH, embedding_VxH, (((1,), (1,)), ((), ())))
    return logits_MxV.reshape(b, p, -1) + bias_V[None, None, :]

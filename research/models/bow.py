"""Bag of embeddings: embedding -> masked mean pool -> dense.

The cheap baseline every results table should show beside the pretrained encoder. Same call
signature as `BertClassifier`, so the trainer, steps and losses do not care which it is.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from research.models.bert import mean_pool
from research.models.dropout import Dropout


class BagOfEmbeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  num_labels: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BxL, attention_mask_BxL, token_type_ids_BxL, *, train: bool = False):
    del token_type_ids_BxL  # a bag has no notion of which sentence a word came from
    x_BxLxH = nn.Embed(self.vocab_size, self.hidden_size, name="token_embed")(input_ids_BxL)
    pooled_BxH = mean_pool(x_BxLxH, attention_mask_BxL)
    pooled_BxH = Dropout(self.dropout)(pooled_BxH, deterministic=not train)
    return nn.Dense(self.num_labels, dtype=self.dtype, name="classifier")(pooled_BxH).astype(jnp.float32)

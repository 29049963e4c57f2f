"""Sample text from a trained causal LM: greedy, temperature, top-k and top-p, seeded.

    python -m research.generate --workdir runs/shakespeare --prompt "ROMEO:" --max_new_tokens 500 \
        --temperature 0.8 --top_k 200 --seed 0

With the KV cache (the default) the prompt is run once and each new token costs one
position; `--nocache` recomputes the whole prefix every token (the reference the tests
compare the cache against).
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from research import compile_cache, xla_env
from research.models.gpt import GPT, init_cache


def filter_logits(logits_BxV: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Temperature, then keep the top_k largest (0 = all), then the smallest set whose
  probability reaches top_p (1 = all). Removed entries become -inf."""
  logits = logits_BxV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep_sorted = before < top_p  # always keeps the most likely token
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


def _pick(logits_BxV, rng, temperature, top_k, top_p):
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def _generate(
  params,
  prompt_BxP: jax.Array,
  rng: jax.Array,
  *,
  model: GPT,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  use_cache: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Returns (tokens BxN, the logits each was drawn from BxNxV). Token i uses fold_in(rng, i)."""
  b, p = prompt_BxP.shape
  total = p + max_new_tokens
  cfg = model.cfg
  if cfg.positions == "learned" and total > cfg.block_size:
    raise ValueError(f"prompt {p} + {max_new_tokens} new tokens > block_size {cfg.block_size}")
  variables = {"params": params}
  if use_cache:
    cache = init_cache(cfg, b, total)
    logits, cache = model.apply(variables, prompt_BxP, cache, 0, method=GPT.decode)
    last = logits[:, -1]

    def step(carry, i):
      last, cache = carry
      tok = _pick(last, jax.random.fold_in(rng, i), temperature, top_k, top_p)
      logits, cache = model.apply(variables, tok[:, None], cache, p + i, method=GPT.decode)
      return (logits[:, 0], cache), (tok, last)

    _, (toks_NxB, logits_NxBxV) = jax.lax.scan(step, (last, cache), jnp.arange(max_new_tokens))
  else:
    buf = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt_BxP)

    def step(buf, i):
      logits = model.apply(variables, buf)[:, p + i - 1]  # the causal mask hides the zeros after
      tok = _pick(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
      return buf.at[:, p + i].set(tok), (tok, logits)

    _, (toks_NxB, logits_NxBxV) = jax.lax.scan(step, buf, jnp.arange(max_new_tokens))
  return toks_NxB.T, logits_NxBxV.swapaxes(0, 1)


_STATICS = ("model", "max_new_tokens", "temperature", "top_k", "top_p", "use_cache")
generate = jax.jit(_generate, static_argnames=_STATICS)
_SAMPLING_DEFAULTS = {
  k: p.default for k, p in inspect.signature(_generate).parameters.items() if p.default is not inspect.Parameter.empty
}


@functools.lru_cache(maxsize=64)
def _program(model: GPT, max_new_tokens: int, temperature: float, top_k: int, top_p: float, use_cache: bool):
  """`generate` with these settings as one program, kept in the executable cache when that is on
  (`research.generate` turns it on: 500 tokens from the Shakespeare GPT take three programs,
  ~6.5 s to compile)."""
  statics = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, use_cache=use_cache)
  fn = jax.jit(functools.partial(_generate, model=model, **statics))
  return compile_cache.cached(fn, "generate", {"model": repr(model), **statics})


def generate_long(params, prompt_BxP, rng, *, model: GPT, max_new_tokens: int, **sampling) -> np.ndarray:
  """Any number of tokens from a model with a finite context: once the window is full, keep its
  last half as the new prompt (nanoGPT crops the context the same way) and continue."""
  block = model.cfg.block_size
  keep = block // 2
  out = np.asarray(prompt_BxP)
  if out.shape[1] >= block:
    out = out[:, -keep:]
  produced, rounds = 0, 0
  while produced < max_new_tokens:
    ctx = out[:, -keep:] if out.shape[1] > keep and produced else out
    n = min(block - ctx.shape[1], max_new_tokens - produced)
    program = _program(model, n, **(_SAMPLING_DEFAULTS | sampling))
    toks, _ = program(params, jnp.asarray(ctx), jax.random.fold_in(rng, rounds))
    out = np.concatenate([out, np.asarray(toks)], axis=1)
    produced, rounds = produced + n, rounds + 1
  return out[:, -max_new_tokens:]


# ---------------------------------------------------------------------------------------
# Command line: sample from a training workdir.
# ---------------------------------------------------------------------------------------


def _define_flags() -> None:
  """Flags exist only when this file is the program (predict.py defines --workdir too)."""
  flags.DEFINE_string("workdir", None, "A causal-LM training workdir.")
  flags.DEFINE_string("step", "latest", "best | latest | a step number")
  flags.DEFINE_string("prompt", "\n", "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 500, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
  flags.DEFINE_integer("top_k", 200, "Keep the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("num_samples", 1, "Samples drawn in one batch.")
  flags.DEFINE_bool("cache", True, "Use the KV cache.")
  flags.DEFINE_string("executable_cache", compile_cache.DEFAULT_DIR, compile_cache.FLAG_HELP)
  flags.mark_flag_as_required("workdir")
  flags.register_validator("max_new_tokens", lambda v: v >= 1, "--max_new_tokens must be >= 1")
  flags.register_validator("temperature", lambda v: v >= 0, "--temperature must be >= 0 (0 = greedy)")
  flags.register_validator("top_k", lambda v: v >= 0, "--top_k must be >= 0 (0 = all)")
  flags.register_validator("top_p", lambda v: 0 < v <= 1, "--top_p must be in (0, 1] (1 = off)")
  flags.register_validator("num_samples", lambda v: v >= 1, "--num_samples must be >= 1")


def load(workdir: str | Path, step: str = "latest"):
  """(model, params, tokenizer) of a causal-LM run."""
  from research import checkpoint, optim
  from research.data import lm

  workdir = Path(workdir)
  if not (workdir / "model_config.json").is_file():
    raise FileNotFoundError(f"{workdir / 'model_config.json'}: not a training workdir (no model_config.json)")
  arch = json.loads((workdir / "model_config.json").read_text())
  if arch.get("arch") != "gpt":
    raise ValueError(f"{workdir}: arch={arch.get('arch')!r}; generation needs a causal LM (arch 'gpt')")
  from research.models.gpt import GPTConfig

  model = GPT(GPTConfig.from_dict(arch))
  chosen = checkpoint.choose_step(workdir / "checkpoints", step, "loss", mode="min")
  at, state, _ = checkpoint.restore_on_host(workdir / "checkpoints", chosen)
  return model, optim.ema_params(state["params"], state["opt_state"]), lm.load_tokenizer(workdir), at


def main(argv):
  del argv
  import logging

  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  xla_env.prepare_process()  # the trainer's XLA:CPU flags (bf16 matmuls need them) and heap setting
  f = flags.FLAGS
  compile_cache.enable(f.executable_cache)
  model, params, tok, at = load(f.workdir, f.step)
  prompt = np.asarray([tok.encode(f.prompt)] * f.num_samples, np.int32)
  if prompt.shape[1] == 0:
    raise app.UsageError(f"--prompt={f.prompt!r} encodes to no tokens: give at least one (the default is a newline)")
  print(f"# {f.workdir} step {at}; prompt {prompt.shape[1]} tokens", file=sys.stderr)
  toks = generate_long(
    params,
    prompt,
    jax.random.key(f.seed),
    model=model,
    max_new_tokens=f.max_new_tokens,
    temperature=f.temperature,
    top_k=min(f.top_k, model.cfg.vocab_size),
    top_p=f.top_p,
    use_cache=f.cache,
  )
  for row in toks:
    print(f.prompt + tok.decode(row.tolist()))
    print("---")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

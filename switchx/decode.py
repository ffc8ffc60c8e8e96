"""Generation with the key/value cache: greedy search, beam search and sampling, each one jitted loop.

    result = generate(config, params, encoder_input_tokens, DecodeConfig(strategy="beam", beam_size=4))
    result.tokens        # [B, max_decode_length] int32: a row ends with EOS (1), then 0s
    result.scores        # [B]: log-probability of the tokens (beam: divided by the length penalty)

The encoder runs once; the decoder then takes one token per step over the cache (EncoderDecoder.decode, which
also projects the encoder output's cross-attention keys and values once). The steps run in a lax.while_loop
that carries the cache and stops when every row has emitted EOS (beam search: when no live hypothesis can
still beat the finished ones) or after max_decode_length tokens. One compile per (config, strategy, batch
shape, max length and beam size); temperature, top-k, top-p and the length penalty are traced values.

MoE layers route without dropping while decoding (DecodeConfig.moe_routing="no_drop", the default): the
config's eval_capacity_factor is replaced by 0 (capacity = group size) for decoding only, so each token goes to
its expert whatever the other rows of the batch do, and a sequence decodes the same alone or in any batch.
"eval_capacity" keeps the model's eval capacity; each step then routes the batch's current tokens as one
group, which differs from routing whole sequences as a full forward pass does (docs/finetuning.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from switchx.config import DecodeConfig, DecoderOnlyConfig, ModelConfig, check_vocab
from switchx.losses import argmax
from switchx.models.decoder_only import DecoderOnly
from switchx.models.encoder_decoder import EncoderDecoder
from switchx.moe.experts import expert_compute_dtype
from switchx.quantize import dequantize

EOS_ID = 1
# Log-probability of an impossible hypothesis: finite, so sums and comparisons never make NaN.
NEG_INF = -1e9


class DecodeResult(NamedTuple):
  tokens: jax.Array                  # [B, L] int32: the best output of each row, 0 after EOS
  scores: jax.Array                  # [B] float32: sum of the tokens' model log-probs, through EOS (sampling:
                                     # before temperature and filtering; beam: / length penalty)
  logits: jax.Array | None = None    # [B, L, V] float32: each step's logits (greedy / sample, on request)
  beams: jax.Array | None = None     # [B, K, L]: beam search's finished hypotheses, best first
  beam_scores: jax.Array | None = None  # [B, K]


def decoding_config(config: ModelConfig, moe_routing: str = "no_drop") -> ModelConfig:
  """The config decoding runs: no dropout, one routing-group partition (decoding runs unsharded) and, with
  moe_routing="no_drop", capacity = group size (eval_capacity_factor 0, no fixed expert_capacity); tokens-choose
  routers then dispatch "dropless", which gives the same outputs and computes only the routed tokens (the
  encoder's whole input would otherwise fill E x its tokens in expert slots).

  MoeConfig itself is unchanged for training and evaluation; only this copy routes without dropping. Under
  semantics="transformers" a step's routing group is one token, so nothing is dropped either way.
  """
  moe = dataclasses.replace(config.moe, num_group_partitions=1)
  if moe_routing == "no_drop" and moe.semantics == "switch":
    moe = dataclasses.replace(moe, eval_capacity_factor=0.0, expert_capacity=None)
    if moe.router == "tokens_choose":  # the same routing, computed for the routed tokens only (moe/dispatch.py)
      moe = dataclasses.replace(moe, dispatch="dropless")
  elif moe_routing not in ("no_drop", "eval_capacity"):
    raise ValueError(f"moe_routing={moe_routing!r}: choose 'no_drop' or 'eval_capacity'.")
  return config.replace(moe=moe, dropout_rate=0.0)


# Parameters the model multiplies in its activation dtype (cast inside every call); the rest (routers, layer norm
# scales, relative position tables) it computes with in float32. The token embedding is handled apart
# (serving_params: kept float32 for the lookup, transposed into logits_kernel when the logits are tied).
_MATMUL_WEIGHTS = ("kernel",)
_EXPERT_WEIGHTS = ("wi", "wi_0", "wi_1", "wo")


def serving_params(config: ModelConfig, params):
  """`params` laid out for decoding: every weight that decoding multiplies in the model's dtype stored in that
  dtype, cast once here instead of inside every generate call (as t5x restores inference checkpoints in
  bfloat16, or transformers' torch_dtype). Routers, layer norm scales and relative position tables stay float32,
  as the model computes with them, and expert weights keep the dtype the experts compute in
  (MoeConfig.expert_dtype). The token embedding stays float32 (decoding gathers rows from it and casts the
  rows: XLA's CPU backend would convert a whole bfloat16 table to float32 to gather from it, in every call);
  with tied logits, `token_embedder/logits_kernel` holds the table transposed, [D, V] in the model's dtype, which
  Embed.attend multiplies instead (without it XLA writes a transposed copy of the table in every call).
  generate(config, serving_params(config, params), ...) returns exactly what generate(config, params, ...)
  does. A float32 model's parameters come back unchanged (there the transposed table measured no faster).
  The speed-up: benchmarks/README.md ("Why the code is shaped this way")."""
  dtype = jnp.dtype(config.dtype)
  if dtype == jnp.float32:
    return params
  expert_dtype = expert_compute_dtype(config.moe.expert_dtype, dtype, 1, train=False)

  def cast(path, x):
    keys = [getattr(k, "key", getattr(k, "name", "")) for k in path]
    name, parent = keys[-1], keys[-2] if len(keys) > 1 else ""
    if name in _MATMUL_WEIGHTS:
      return x.astype(dtype)
    if parent == "experts" and name in _EXPERT_WEIGHTS:
      return x.astype(expert_dtype)
    return x

  served = jax.tree_util.tree_map_with_path(cast, params)
  if getattr(config, "logits_via_embedding", False):
    embedder = dict(served["token_embedder"])
    embedder["logits_kernel"] = jnp.asarray(embedder["embedding"]).T.astype(dtype)   # [D, V]
    served = {**served, "token_embedder": embedder}
  return served


def length_penalty(length, alpha):
  """T5's brevity penalty ((5 + length) / 6) ** alpha; length counts the generated tokens, EOS included."""
  return ((5.0 + length) / 6.0) ** alpha


# --- the pieces every strategy shares -----------------------------------------------------------------------
def _start(model, params, inputs: jax.Array, max_length: int, task_ids: jax.Array | None = None):
  """(cache, step, first): the decoding cache, the one-step function step(cache, tokens [B]) -> (logits [B, V],
  cache), and the first step's input tokens [B]. An encoder-decoder encodes `inputs` once (first: the start
  token 0); a decoder-only model reads its prompt `inputs` [B, Lp] into the cache (first: the prompt's last
  token). task_ids [B]: each row's task, for task-routed MoE layers (MoeConfig.route_by="task")."""
  params = dequantize(params)                  # quantized expert weights: dequantized inside the jitted loop
  if isinstance(model, DecoderOnly):
    return _start_causal(model, params, inputs, max_length)
  cache, step = _start_encoder_decoder(model, params, inputs, max_length, task_ids)
  return cache, step, jnp.zeros((inputs.shape[0],), jnp.int32)


def _start_causal(model: DecoderOnly, params, prompt: jax.Array, max_length: int):
  batch, prompt_length = prompt.shape
  empty = jnp.zeros((batch, prompt_length - 1 + max_length), jnp.int32)           # sizes the cache
  _, variables = model.apply({"params": params}, empty, method=DecoderOnly.decode, mutable=["cache"])
  cache = variables["cache"]
  if prompt_length > 1:                                                          # the prompt but its last token
    _, variables = model.apply({"params": params, "cache": cache}, prompt[:, :-1], method=DecoderOnly.decode,
                               mutable=["cache"])
    cache = variables["cache"]

  def step(cache, tokens):
    (logits, _), updated = model.apply({"params": params, "cache": cache}, tokens[:, None],
                                       method=DecoderOnly.decode, mutable=["cache"])
    return logits[:, 0], updated["cache"]

  return cache, step, prompt[:, -1]


def _start_encoder_decoder(model: EncoderDecoder, params, encoder_tokens: jax.Array, max_length: int,
                           task_ids: jax.Array | None = None):
  """Encoder output and an empty cache for [B, max_length] decoder tokens, and the one-step function."""
  encoded, _ = model.apply({"params": params}, encoder_tokens, encoder_task_ids=task_ids,
                           method=EncoderDecoder.encode)                                        # [B, Le, D]
  batch = encoder_tokens.shape[0]
  empty = jnp.zeros((batch, max_length), jnp.int32)                                          # sizes the cache
  _, variables = model.apply({"params": params}, encoded, encoder_tokens, empty, task_ids,
                             method=EncoderDecoder.decode, mutable=["cache"])

  def step(cache, tokens):
    """Previous tokens [B] -> (logits [B, V] float32, updated cache)."""
    (logits, _), updated = model.apply({"params": params, "cache": cache}, encoded, encoder_tokens,
                                       tokens[:, None], task_ids, method=EncoderDecoder.decode, mutable=["cache"])
    return logits[:, 0], updated["cache"]

  return variables["cache"], step


def _filtered_sample(rng, logits, temperature, top_k, top_p):
  """A token per row [B] from logits [B, V]: among the top_k most likely (0: all), the smallest set of mass
  >= top_p (1: all), at the temperature; temperature 0 takes the most likely token (no randomness). All three
  are traced values: one compile serves every setting."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]                                   # [B, V], descending
  limited = (top_k > 0) & (jnp.arange(vocab) >= top_k)                           # [V]: beyond the top k
  kth_best = jnp.take(ordered, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1)[:, None]  # [B, 1]
  logits = jnp.where((top_k > 0) & (logits < kth_best), -jnp.inf, logits)
  most_likely = argmax(logits)
  deterministic = temperature <= 0
  temperature = jnp.maximum(temperature, 1e-6)
  ordered = jnp.where(limited, -jnp.inf, ordered) / temperature
  probs = jax.nn.softmax(ordered, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs                               # [B, V]
  cutoff = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)  # keeps >= 1
  scaled = logits / temperature
  nucleus = jnp.where((top_p < 1.0) & (scaled < cutoff), -jnp.inf, scaled)
  sampled = jax.random.categorical(rng, nucleus, axis=-1)
  return jnp.where(deterministic, most_likely, sampled.astype(jnp.int32))


# --- greedy and sampling --------------------------------------------------------------------------------------
def _sample_loop(params, encoder_tokens, task_ids, rng, temperature, top_k, top_p, *, model: EncoderDecoder,
                 max_length: int, greedy: bool, return_logits: bool) -> DecodeResult:
  batch, vocab = encoder_tokens.shape[0], model.config.vocab_size
  cache, step, first = _start(model, params, encoder_tokens, max_length, task_ids)
  rows = jnp.arange(batch)
  state = dict(
      i=jnp.zeros((), jnp.int32), cache=cache, last=first,
      tokens=jnp.zeros((batch, max_length), jnp.int32), done=jnp.zeros((batch,), bool),
      scores=jnp.zeros((batch,), jnp.float32),
      logits=jnp.zeros((batch, max_length, vocab), jnp.float32) if return_logits else None)

  def cond(s):
    return (s["i"] < max_length) & ~jnp.all(s["done"])

  def body(s):
    i = s["i"]
    logits, cache = step(s["cache"], s["last"])                                  # [B, V]
    if greedy:
      token = argmax(logits)
    else:
      token = _filtered_sample(jax.random.fold_in(rng, i), logits, temperature, top_k, top_p)
    token = jnp.where(s["done"], 0, token)                                       # [B]
    # log_softmax(logits)[token] without writing log_softmax out: one fused pass for the normaliser.
    log_prob = logits[rows, token] - jax.nn.logsumexp(logits, axis=-1)          # [B]
    scores = s["scores"] + jnp.where(s["done"], 0.0, log_prob)
    out = dict(i=i + 1, cache=cache, last=token, tokens=s["tokens"].at[:, i].set(token),
               done=s["done"] | (token == EOS_ID), scores=scores, logits=s["logits"])
    if return_logits:
      out["logits"] = s["logits"].at[:, i].set(logits)
    return out

  final = jax.lax.while_loop(cond, body, state)
  return DecodeResult(final["tokens"], final["scores"], final["logits"])


# --- beam search ---------------------------------------------------------------------------------------------
def _beam_loop(params, encoder_tokens, task_ids, alpha, *, model: EncoderDecoder, max_length: int,
               beam_size: int) -> DecodeResult:
  """Beam search with T5's length penalty, K = beam_size live hypotheses per row.

  Each step scores the 2K best continuations of the live hypotheses. One that ends with EOS (or reaches
  max_length) and ranks among the best K is finished, scored log p / length_penalty, and competes with the
  finished ones so far for K places; the K best that do not end become the live hypotheses (so K stay live).
  A row stops when its worst kept finished score beats the best a live hypothesis could still reach. With
  K = 1 and alpha = 0 this is greedy search.
  """
  batch, k, vocab = encoder_tokens.shape[0], beam_size, model.config.vocab_size
  beam_tasks = None if task_ids is None else jnp.repeat(task_ids, k, axis=0)
  cache, step, first = _start(model, params, jnp.repeat(encoder_tokens, k, axis=0), max_length,
                              beam_tasks)                                                   # rows b * K + j
  ranks = jnp.arange(2 * k)
  best_possible = lambda live_logp: live_logp[:, 0] / length_penalty(max_length, alpha)   # [B]
  state = dict(
      i=jnp.zeros((), jnp.int32), cache=cache,
      live=jnp.zeros((batch, k, max_length), jnp.int32),
      live_logp=jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1)),  # [B, K]
      finished=jnp.zeros((batch, k, max_length), jnp.int32),
      finished_scores=jnp.full((batch, k), NEG_INF, jnp.float32))

  def cond(s):
    settled = s["finished_scores"][:, -1] >= best_possible(s["live_logp"])
    return (s["i"] < max_length) & ~jnp.all(settled)

  def body(s):
    i = s["i"]
    last = jnp.where(i == 0, first.reshape(batch, k), s["live"][:, :, jnp.maximum(i - 1, 0)])  # [B, K]
    logits, cache = step(s["cache"], last.reshape(-1))                           # [B*K, V]
    log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, k, vocab)
    candidates = (s["live_logp"][:, :, None] + log_probs).reshape(batch, k * vocab)
    top_logp, top_index = jax.lax.top_k(candidates, 2 * k)                      # [B, 2K], best first
    origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    sequences = jnp.take_along_axis(s["live"], origin[:, :, None], axis=1)      # [B, 2K, L]
    sequences = sequences.at[:, :, i].set(token)
    ends = token == EOS_ID

    finishing = (ends | (i == max_length - 1)) & (ranks < k)[None, :]           # [B, 2K]
    new_scores = jnp.where(finishing, top_logp / length_penalty(i + 1, alpha), NEG_INF)
    all_scores = jnp.concatenate([s["finished_scores"], new_scores], axis=1)    # [B, 3K]
    all_sequences = jnp.concatenate([s["finished"], sequences], axis=1)
    finished_scores, keep = jax.lax.top_k(all_scores, k)
    finished = jnp.take_along_axis(all_sequences, keep[:, :, None], axis=1)

    live_logp, live_pick = jax.lax.top_k(jnp.where(ends, NEG_INF, top_logp), k)  # [B, K]
    live = jnp.take_along_axis(sequences, live_pick[:, :, None], axis=1)
    parent = jnp.take_along_axis(origin, live_pick, axis=1)                      # [B, K]
    rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)                 # [B*K]
    # Every cache leaf of rank >= 1 is batch-major (the models' decode); the index scalars are shared.
    cache = jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0) if x.ndim else x, cache)
    return dict(i=i + 1, cache=cache, live=live, live_logp=live_logp, finished=finished,
                finished_scores=finished_scores)

  final = jax.lax.while_loop(cond, body, state)
  return DecodeResult(final["finished"][:, 0], final["finished_scores"][:, 0], beams=final["finished"],
                      beam_scores=final["finished_scores"])


@functools.lru_cache(maxsize=32)
def _compiled(config: ModelConfig | DecoderOnlyConfig, strategy: str, max_length: int, beam_size: int,
              return_logits: bool):
  model = DecoderOnly(config) if isinstance(config, DecoderOnlyConfig) else EncoderDecoder(config)
  if strategy == "beam":
    return jax.jit(functools.partial(_beam_loop, model=model, max_length=max_length, beam_size=beam_size))
  return jax.jit(functools.partial(_sample_loop, model=model, max_length=max_length, greedy=strategy == "greedy",
                                   return_logits=return_logits))


def generate(config: ModelConfig, params, encoder_input_tokens, decode_config: DecodeConfig = DecodeConfig(),
             rng: jax.Array | None = None, return_logits: bool = False, task_ids=None) -> DecodeResult:
  """Decodes every row of encoder_input_tokens [B, Le] (ids, 0 = padding) as decode_config says. For a
  decoder-only model (a DecoderOnlyConfig) they are the prompts [B, Lp], every row Lp real tokens (no padding),
  and the result is each row's continuation.

  `config` is the model's own config (decoding_config derives the routing from it). `params`: the float32
  parameters (cast to config.dtype inside each call) or serving_params(config, params) (cast once, for many
  calls; the same results). rng: sampling's random stream (default: PRNGKey(decode_config.seed)).
  return_logits: also each step's logits [B, L, V] (greedy and sampling; rows that have finished keep stepping
  on 0 tokens, and their logits are kept as computed). task_ids [B] (or an int for every row): each row's task,
  which a task-routed model (MoeConfig.route_by="task") needs; other models ignore it.
  """
  dc = decode_config
  tokens = np.asarray(encoder_input_tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[0] == 0:
    raise ValueError(f"encoder_input_tokens: expected a [batch, length] array of integer ids with at least one "
                     f"row, got shape {tokens.shape} and dtype {tokens.dtype}.")
  if tokens.size:
    check_vocab(config, int(tokens.max()), "encoder_input_tokens")
  if isinstance(config, DecoderOnlyConfig) and (tokens.shape[1] == 0 or (tokens == 0).any()):
    raise ValueError("a decoder-only model's prompts are [batch, length] arrays of real tokens (no 0 = padding, "
                     "at least one token a row): decode prompts of different lengths in separate calls.")
  if dc.strategy == "beam" and 2 * dc.beam_size > config.vocab_size:
    raise ValueError(f"DecodeConfig.beam_size={dc.beam_size}: beam search scores 2 * beam_size continuations, "
                     f"more than the vocabulary of {config.vocab_size}; use a smaller beam.")
  if dc.strategy == "sample" and dc.top_k > config.vocab_size:
    raise ValueError(f"DecodeConfig.top_k={dc.top_k} exceeds the vocabulary of {config.vocab_size}.")
  fn = _compiled(decoding_config(config, dc.moe_routing), dc.strategy, dc.max_decode_length,
                 dc.beam_size if dc.strategy == "beam" else 0, return_logits and dc.strategy != "beam")
  tokens = jnp.asarray(tokens, jnp.int32)
  task_ids = _row_tasks(config, task_ids, tokens.shape[0])
  if dc.strategy == "beam":
    return fn(params, tokens, task_ids, jnp.float32(dc.length_penalty))
  rng = jax.random.PRNGKey(dc.seed) if rng is None else rng
  return fn(params, tokens, task_ids, rng, jnp.float32(dc.temperature), jnp.int32(dc.top_k), jnp.float32(dc.top_p))


def _row_tasks(config, task_ids, batch: int) -> jax.Array | None:
  """Each row's task id [B] int32 for a task-routed model (checked against its num_tasks), else None."""
  moe = config.moe
  if moe.route_by != "task" or moe.num_tasks == 1:
    return None
  if task_ids is None:
    raise ValueError(f"this model routes by task ({moe.num_tasks} tasks): pass task_ids=[task of each row] (each "
                     "example's task index in the fine-tuning mixture).")
  task_ids = np.broadcast_to(np.asarray(task_ids), (batch,))
  if not np.issubdtype(task_ids.dtype, np.integer) or task_ids.min() < 0 or task_ids.max() >= moe.num_tasks:
    raise ValueError(f"task_ids {task_ids.tolist()}: expected integer task indices in 0 .. {moe.num_tasks - 1}.")
  return jnp.asarray(task_ids, jnp.int32)


# --- text in, text out ----------------------------------------------------------------------------------------
def encode_inputs(tokenizer, texts: Sequence[str], length: int | None = None) -> np.ndarray:
  """Texts -> [B, length] ids, each ended by EOS and padded with 0; longer inputs are cut (keeping EOS).
  length None: the longest input's length."""
  ids = [list(t)[: (length - 1) if length else None] + [EOS_ID] for t in tokenizer.encode_batch(list(texts))]
  width = length or max(len(t) for t in ids)
  out = np.zeros((len(ids), width), np.int32)
  for row, t in enumerate(ids):
    out[row, :len(t)] = t
  return out


def output_ids(tokens) -> list[list[int]]:
  """[B, L] decoder outputs -> each row's ids before the first EOS (and without padding)."""
  rows = []
  for row in np.asarray(tokens).tolist():
    row = row[: row.index(EOS_ID)] if EOS_ID in row else row
    rows.append([t for t in row if t != 0])
  return rows


def decode_texts(config: ModelConfig, params, tokenizer, texts: Sequence[str],
                 decode_config: DecodeConfig = DecodeConfig(), inputs_length: int | None = None,
                 batch_size: int | None = None, task_id: int | None = None) -> list[str]:
  """Generated text for each input text, in batches of `batch_size` rows (a short last batch is padded with
  empty rows, so every batch has one shape and one compile). task_id: the texts' task (task-routed models)."""
  texts = list(texts)
  if not texts:
    return []
  ids = encode_inputs(tokenizer, texts, inputs_length)
  batch_size = batch_size or len(texts)
  params = serving_params(config, params)                                      # cast once for every batch
  outputs = []
  for start in range(0, len(texts), batch_size):
    chunk = ids[start:start + batch_size]
    padded = np.zeros((batch_size, ids.shape[1]), np.int32)
    padded[:len(chunk)] = chunk
    padded[len(chunk):, 0] = EOS_ID                                               # an empty input: just EOS
    result = generate(config, params, padded, decode_config, task_ids=task_id)
    outputs.extend(tokenizer.decode(row) for row in output_ids(jax.device_get(result.tokens))[:len(chunk)])
  return outputs

"""The deterministic, checkpointable span-corruption input pipeline for pretraining.

As in T5's pretraining: documents are tokenized and concatenated into one token stream (no separator), the
stream is cut into chunks of the raw length that span corruption turns into at most `inputs_length` input and
`targets_length` target tokens, and each chunk becomes one (inputs, targets) example.

Determinism without stored buffers: epoch e visits the chunks in a permutation drawn from (seed, e), and the
corruption of chunk c in epoch e uses an RNG drawn from (seed, e, c). Any example can therefore be regenerated
from its (epoch, position) alone, and a batch always starts at an example boundary, so the whole iterator state
is two integers. Process p of n takes positions p, p + n, p + 2n, ... of each epoch's permutation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from switchx.data.packing import RowPacker
from switchx.data.span_corruption import noise_counts, raw_length_for, span_corrupt

# Distinct first words of the RNG seeds, so the shuffle and the corruption never draw from the same stream.
_SHUFFLE_STREAM = 0
_CORRUPTION_STREAM = 1
_STATE_VERSION = 1
_ENCODE_CHUNK_DOCS = 4096  # Documents tokenized per call: bounds the Python lists held at once.


class Pipeline:
  """Endless iterator of packed span-corruption batches (dicts of [batch_size, length] arrays)."""

  def __init__(self, documents: Iterable[str], tokenizer, *, batch_size: int, inputs_length: int,
               targets_length: int, seed: int, pack: bool = True, process_index: int = 0,
               process_count: int = 1, noise_density: float = 0.15, mean_noise_span_length: float = 3.0):
    # Cheap checks first: a bad argument should not cost a tokenization pass over the corpus.
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
      raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}.")
    self.raw_length = self._raw_length(inputs_length, targets_length, noise_density, mean_noise_span_length)
    self._check_sentinels(tokenizer, noise_density, mean_noise_span_length)
    if isinstance(documents, str):
      raise TypeError("documents must be a collection of strings, not one string.")
    documents = documents if isinstance(documents, Sequence) else list(documents)
    if len(documents) == 0:
      raise ValueError("the corpus has no documents.")

    self.batch_size, self.inputs_length, self.targets_length = batch_size, inputs_length, targets_length
    self.seed, self.pack = int(seed), pack
    self.process_index, self.process_count = process_index, process_count
    self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
    self.vocab_size = tokenizer.vocab_size

    self._tokens = _tokenize_and_concatenate(documents, tokenizer)  # [num_tokens] int32
    self.num_examples = _count_chunks(len(self._tokens), self.raw_length)
    if self.num_examples == 0:
      raise ValueError(f"the corpus has {len(self._tokens)} tokens, not enough for one example (2 tokens).")
    if self.num_examples < process_count:
      raise ValueError(f"the corpus makes {self.num_examples} examples, fewer than process_count="
                       f"{process_count}; some processes would get no data.")
    # Positions p, p + n, ... of a permutation of num_examples items: the same count in every epoch.
    self.examples_per_epoch = len(range(process_index, self.num_examples, process_count))
    self._epoch, self._position = 0, 0
    self._order_epoch, self._order = None, None  # cache of the current epoch's permutation

  def _raw_length(self, inputs_length, targets_length, noise_density, mean_noise_span_length) -> int:
    return raw_length_for(inputs_length, targets_length, noise_density, mean_noise_span_length)

  def _check_sentinels(self, tokenizer, noise_density, mean_noise_span_length) -> None:
    max_spans = noise_counts(self.raw_length, noise_density, mean_noise_span_length)[1]
    if max_spans > tokenizer.extra_ids:
      raise ValueError(f"examples of {self.raw_length} raw tokens need up to {max_spans} sentinels, but the "
                       f"tokenizer has extra_ids={tokenizer.extra_ids}. Use shorter lengths or more extra_ids.")

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    packer = RowPacker(self.batch_size, self.inputs_length, self.targets_length, self.pack)
    # The example that no longer fits is left unconsumed; the next batch regenerates and starts with it.
    while packer.add(*self.example(self._epoch, self._position)):
      self._position += 1
      if self._position == self.examples_per_epoch:
        self._epoch, self._position = self._epoch + 1, 0
    return packer.batch()

  def example(self, epoch: int, position: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of this process's `position`-th example in `epoch`, independent of iteration."""
    chunk = int(self._epoch_order(epoch)[self.process_index + position * self.process_count])
    tokens = self._tokens[chunk * self.raw_length:(chunk + 1) * self.raw_length]  # [<= raw_length]
    rng = np.random.default_rng([self.seed, _CORRUPTION_STREAM, epoch, chunk])
    return span_corrupt(tokens, self.vocab_size, rng, self.noise_density, self.mean_noise_span_length)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if self._order_epoch != epoch:
      rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch])
      self._order_epoch, self._order = epoch, rng.permutation(self.num_examples)  # [num_examples]
    return self._order

  def get_state(self) -> dict:
    """JSON-serialisable position of the iterator, plus the settings it is only valid for."""
    return {"version": _STATE_VERSION, "epoch": self._epoch, "position": self._position,
            **self._fingerprint()}

  def set_state(self, state: dict) -> None:
    """Continues from `state` (from `get_state` of a pipeline with the same corpus and settings)."""
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"pipeline state version {state.get('version')!r}, expected {_STATE_VERSION}.")
    mismatched = {key: (state.get(key), value) for key, value in self._fingerprint().items()
                  if state.get(key) != value}
    if mismatched:
      details = ", ".join(f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in mismatched.items())
      raise ValueError(f"pipeline state is from a different corpus or configuration ({details}).")
    if not (state["epoch"] >= 0 and 0 <= state["position"] < self.examples_per_epoch):
      raise ValueError(f"pipeline state epoch={state['epoch']}, position={state['position']} is out of "
                       f"range (examples_per_epoch={self.examples_per_epoch}).")
    self._epoch, self._position = int(state["epoch"]), int(state["position"])

  def _fingerprint(self) -> dict:
    return {"seed": self.seed, "process_index": self.process_index, "process_count": self.process_count,
            "num_examples": self.num_examples, "raw_length": self.raw_length, "num_tokens": len(self._tokens),
            "batch_size": self.batch_size, "inputs_length": self.inputs_length,
            "targets_length": self.targets_length, "pack": self.pack, "noise_density": self.noise_density,
            "mean_noise_span_length": self.mean_noise_span_length}


class CausalPipeline(Pipeline):
  """Batches for a decoder-only (causal) language model: the same token stream, cut into chunks of L + 1 tokens
  (L = inputs_length + targets_length, the encoder-decoder's tokens per row), visited in the same deterministic,
  checkpointable order; row = chunk[:-1] as decoder_input_tokens, chunk[1:] as decoder_target_tokens, no
  corruption, no packing (the stream is contiguous). A short last chunk is padded with 0 and weighted 0."""

  def __init__(self, documents: Iterable[str], tokenizer, *, batch_size: int, inputs_length: int,
               targets_length: int, seed: int, process_index: int = 0, process_count: int = 1, **unused):
    self.raw_length_override = inputs_length + targets_length + 1
    super().__init__(documents, tokenizer, batch_size=batch_size, inputs_length=inputs_length,
                     targets_length=targets_length, seed=seed, pack=False, process_index=process_index,
                     process_count=process_count)

  def _raw_length(self, inputs_length, targets_length, noise_density, mean_noise_span_length):
    return self.raw_length_override

  def _check_sentinels(self, tokenizer, noise_density, mean_noise_span_length) -> None:
    pass                                                           # nothing is corrupted

  def __next__(self) -> dict[str, np.ndarray]:
    length = self.raw_length - 1
    rows = np.zeros((self.batch_size, length + 1), np.int32)                    # [B, L + 1]
    for row in range(self.batch_size):
      chunk = self.chunk(self._epoch, self._position)
      rows[row, :len(chunk)] = chunk
      self._position += 1
      if self._position == self.examples_per_epoch:
        self._epoch, self._position = self._epoch + 1, 0
    targets = rows[:, 1:]
    return {"decoder_input_tokens": rows[:, :-1], "decoder_target_tokens": targets,
            "decoder_loss_weights": (targets > 0).astype(np.float32)}

  def chunk(self, epoch: int, position: int) -> np.ndarray:
    index = int(self._epoch_order(epoch)[self.process_index + position * self.process_count])
    return self._tokens[index * self.raw_length:(index + 1) * self.raw_length]    # [<= L + 1]

  def _fingerprint(self) -> dict:
    return {**super()._fingerprint(), "objective": "causal_lm"}


def _tokenize_and_concatenate(documents: Sequence[str], tokenizer) -> np.ndarray:
  pieces = []
  for start in range(0, len(documents), _ENCODE_CHUNK_DOCS):
    batch = [documents[i] for i in range(start, min(start + _ENCODE_CHUNK_DOCS, len(documents)))]
    pieces.extend(np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(batch))
  return np.concatenate(pieces) if pieces else np.zeros([0], np.int32)  # [num_tokens]


def _count_chunks(num_tokens: int, raw_length: int) -> int:
  """Chunks of `raw_length` tokens; a shorter last chunk counts only if it has the 2 tokens corruption needs."""
  full, rest = divmod(num_tokens, raw_length)
  return full + (rest >= 2)


def split_documents(documents: Sequence[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
  """(train, eval) documents: a seeded random `eval_fraction` of them (at least one) held out.

  Both parts keep the documents' original order.
  """
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
  documents = list(documents)
  num_eval = max(1, round(len(documents) * eval_fraction))
  if num_eval >= len(documents):
    raise ValueError(f"cannot hold out {num_eval} of {len(documents)} documents and keep some for training.")
  is_eval = np.zeros(len(documents), bool)
  is_eval[np.random.default_rng(seed).permutation(len(documents))[:num_eval]] = True
  return ([doc for doc, held in zip(documents, is_eval) if not held],
          [doc for doc, held in zip(documents, is_eval) if held])

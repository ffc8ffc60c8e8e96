"""SentencePiece tokenizer with T5's conventions, and on-the-fly training of a small one.

T5 ids: pad = 0, eos = 1, unk = 2, no bos. After the SentencePiece pieces come `extra_ids` sentinel ids used by
span corruption; sentinel i is `vocab_size - 1 - i`, i.e. they count down from the end of the vocabulary:

    [ pad eos unk  piece ... piece | <extra_id_99> ... <extra_id_1> <extra_id_0> ]
      0   1   2                      sp_size                         vocab_size - 1
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from switchx.data.corpus import default_cache_dir, write_atomically

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


class Tokenizer:
  """Text <-> ids with a SentencePiece model plus `extra_ids` sentinels appended at the end of the vocabulary."""

  def __init__(self, model_proto: bytes, extra_ids: int = 100):
    if extra_ids < 0:
      raise ValueError(f"extra_ids must be >= 0, got {extra_ids}.")
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError:
      raise ValueError("not a serialized SentencePiece model (the bytes of a .model file).") from None
    self._model_proto = model_proto
    self.extra_ids = extra_ids
    if self._sp.pad_id() != PAD_ID or self._sp.eos_id() != EOS_ID:
      raise ValueError(
          f"SentencePiece model has pad_id={self._sp.pad_id()}, eos_id={self._sp.eos_id()}; T5 conventions "
          f"need pad_id={PAD_ID}, eos_id={EOS_ID}. Retrain it with --pad_id=0 --eos_id=1 --unk_id=2 "
          "--bos_id=-1 (or use train_tokenizer)."
      )

  @classmethod
  def load(cls, path: str | os.PathLike, extra_ids: int = 100) -> Tokenizer:
    """Loads a SentencePiece .model file, e.g. T5's 32k `sentencepiece.model`."""
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no such SentencePiece model file.")
    try:
      return cls(path.read_bytes(), extra_ids)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None

  def save(self, path: str | os.PathLike) -> None:
    """Writes the SentencePiece model (sentinels are implied by extra_ids, not stored)."""
    write_atomically(Path(path), self._model_proto)

  @property
  def sp_size(self) -> int:
    """Number of SentencePiece pieces, i.e. the first sentinel-free ids [0, sp_size)."""
    return self._sp.get_piece_size()

  @property
  def vocab_size(self) -> int:
    return self.sp_size + self.extra_ids

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def sentinel(self, i: int) -> int:
    """Id of `<extra_id_i>`."""
    if not 0 <= i < self.extra_ids:
      raise ValueError(f"sentinel index {i} out of range [0, {self.extra_ids}).")
    return self.vocab_size - 1 - i

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without eos."""
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of many texts at once (SentencePiece runs them on several threads)."""
    return self._sp.encode(list(texts))

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`. Sentinels render as `<extra_id_i>`; pad and eos render as nothing."""
    pieces, run = [], []  # `run` collects ordinary ids between sentinels.
    for token in np.asarray(list(ids), dtype=np.int64).tolist():
      if not 0 <= token < self.vocab_size:
        raise ValueError(f"id {token} is outside the vocabulary [0, {self.vocab_size}).")
      if token < self.sp_size:
        run.append(token)
        continue
      if run:
        pieces.append(self._sp.decode(run))
        run = []
      pieces.append(f"<extra_id_{self.vocab_size - 1 - token}>")
    if run:
      pieces.append(self._sp.decode(run))
    return "".join(pieces)


# ----------------------------------------------------------------------------------------------------------------
# Training

# Every setting that changes the trained model; all of them are part of the cache key.
_TRAINER_SETTINGS = dict(
    model_type="unigram",
    pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
    character_coverage=0.9995,  # Rare characters become unk rather than each taking a vocabulary slot.
    input_sentence_size=2_000_000,  # Caps memory and time on big corpora (a random sample of this many lines).
    shuffle_input_sentence=True,
    max_sentence_length=16384,  # In bytes; our lines are cut to _MAX_LINE_CHARS characters below.
    num_threads=4,  # Fixed, not os.cpu_count(): the trained model depends on the thread count.
)
_RANDOM_SEED = 0
_MAX_LINE_CHARS = 2000


def train_tokenizer(texts: Iterable[str], vocab_size: int, cache_dir: str | os.PathLike | None = None,
                    extra_ids: int = 100) -> Tokenizer:
  """Trains a unigram SentencePiece model of `vocab_size` pieces on `texts`, in memory.

  The resulting Tokenizer has `vocab_size + extra_ids` ids. The model is cached in `cache_dir` (default
  `default_cache_dir("tokenizer")`) under a hash of the texts, the vocabulary size and the trainer settings,
  so a second call with the same arguments only reads a file. Training is deterministic.
  """
  texts = list(texts)
  if vocab_size < 4:
    raise ValueError(f"vocab_size must be at least 4 (pad, eos, unk and one piece), got {vocab_size}.")
  if not any(text.strip() for text in texts):
    raise ValueError("train_tokenizer got no text to train on.")

  cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir("tokenizer")
  cache_file = cache_dir / f"unigram-{vocab_size}-{_training_key(texts, vocab_size)}.model"
  if cache_file.is_file():
    return Tokenizer(cache_file.read_bytes(), extra_ids)

  spm.set_random_generator_seed(_RANDOM_SEED)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=_training_lines(texts), model_writer=model,
                                   vocab_size=vocab_size, minloglevel=2, **_TRAINER_SETTINGS)
  except RuntimeError as e:
    # Typically "Vocabulary size too high (N). Please set it to a value <= M." on a small corpus.
    raise ValueError(f"SentencePiece training failed for vocab_size={vocab_size}: {e}. "
                     "Use a smaller vocab_size or more text.") from None
  write_atomically(cache_file, model.getvalue())
  return Tokenizer(model.getvalue(), extra_ids)


def _training_key(texts: list[str], vocab_size: int) -> str:
  digest = hashlib.sha256()
  settings = dict(_TRAINER_SETTINGS, vocab_size=vocab_size, seed=_RANDOM_SEED, sentencepiece=spm.__version__,
                  max_line_chars=_MAX_LINE_CHARS)
  digest.update(json.dumps(settings, sort_keys=True).encode())
  for text in texts:
    data = text.encode("utf-8")
    digest.update(len(data).to_bytes(8, "little"))  # Length prefix: ["ab", "c"] and ["a", "bc"] differ.
    digest.update(data)
  return digest.hexdigest()[:16]


def _training_lines(texts: Iterable[str]):
  """Lines of at most _MAX_LINE_CHARS characters, cut at spaces: SentencePiece skips longer "sentences"."""
  for text in texts:
    for line in text.splitlines():
      line = line.strip()
      while len(line) > _MAX_LINE_CHARS:
        cut = line.rfind(" ", 0, _MAX_LINE_CHARS)
        if cut <= 0:
          cut = _MAX_LINE_CHARS
        yield line[:cut]
        line = line[cut:].lstrip()
      if line:
        yield line

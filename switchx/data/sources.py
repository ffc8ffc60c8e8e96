"""DataConfig -> documents and tokenizer: the one place `switchx train`, fine-tuning and decoding build them,
so a run's tokenizer can always be rebuilt exactly (it is deterministic and cached)."""

from __future__ import annotations

from switchx.config import DataConfig
from switchx.data.corpus import builtin_corpus, read_text_files, tfds_source
from switchx.data.pipeline import split_documents
from switchx.data.tokenizer import Tokenizer, train_tokenizer


def load_documents(data: DataConfig, seed: int | None = None):
  """(training documents, held-out documents). tfds datasets use their splits; other sources hold out
  `eval_fraction` of the documents, chosen by `seed` (default: DataConfig.split_seed, which does not change
  with the training seed)."""
  if data.source == "tfds":
    return (tfds_source(data.tfds_name, data.tfds_data_dir, data.train_split, data.text_field),
            tfds_source(data.tfds_name, data.tfds_data_dir, data.eval_split, data.text_field))
  documents = builtin_corpus() if data.source == "builtin" else read_text_files(data.paths, data.text_field)
  return split_documents(documents, data.eval_fraction, seed=data.split_seed if seed is None else seed)


def load_tokenizer(data: DataConfig, train_documents=None, seed: int | None = None) -> Tokenizer:
  """The given SentencePiece file, or one trained (and cached) on the training documents (those of the split
  `seed`, default DataConfig.split_seed)."""
  if data.tokenizer_path:
    return Tokenizer.load(data.tokenizer_path)
  if train_documents is None:
    train_documents, _ = load_documents(data, seed)
  return train_tokenizer(train_documents, vocab_size=data.tokenizer_vocab_size)

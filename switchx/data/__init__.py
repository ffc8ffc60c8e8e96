"""Data side of switchx: documents -> tokens -> span corruption -> packed encoder-decoder batches (numpy only)."""

from switchx.data.corpus import builtin_corpus, read_text_files, tfds_source
from switchx.data.packing import BATCH_KEYS, RowPacker, pack_examples
from switchx.data.pipeline import CausalPipeline, Pipeline, split_documents
from switchx.data.span_corruption import (corrupted_lengths, inverse, noise_span_mask, raw_length_for,
                                          span_corrupt)
from switchx.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "BATCH_KEYS", "CausalPipeline", "Pipeline", "RowPacker", "Tokenizer", "builtin_corpus", "corrupted_lengths", "inverse",
    "noise_span_mask", "pack_examples", "raw_length_for", "read_text_files", "span_corrupt", "split_documents",
    "tfds_source", "train_tokenizer",
]

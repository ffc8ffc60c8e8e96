"""Document sources (built-in, local files, tfds without TensorFlow) and the T5-style tokenizer."""

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from pydoc_data.topics import topics

from switchx.data import corpus
from switchx.data.corpus import builtin_corpus, read_text_files, tfds_source
from switchx.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
  """Nothing a test does may write into the home directory's cache."""
  monkeypatch.setenv("SWITCHX_CACHE", str(tmp_path / "switchx-cache"))
  return tmp_path / "switchx-cache"


# ----------------------------------------------------------------------------------------------------------------
# Built-in corpus


def test_builtin_corpus_is_large_deterministic_and_cached(private_cache, tmp_path, monkeypatch):
  documents = builtin_corpus()
  assert len(documents) > 1000
  assert sum(map(len, documents)) > 1_000_000  # ~0.5 MB of topics + ~1.2 MB of docstrings.
  assert all(doc and doc == " ".join(doc.split()) for doc in documents)  # Whitespace normalised.
  cache_files = list((private_cache / "corpus").glob("*.jsonl"))
  assert len(cache_files) == 1 and "python3." in cache_files[0].name

  # A fresh build elsewhere gives the same documents in the same order.
  assert builtin_corpus(cache_dir=tmp_path / "elsewhere") == documents

  # The second call reads the cache: building again would now fail.
  def no_building():
    raise AssertionError("rebuilt instead of reading the cache")

  monkeypatch.setattr(corpus, "_stdlib_docstrings", no_building)
  assert builtin_corpus() == documents


# ----------------------------------------------------------------------------------------------------------------
# Local files


def test_reads_txt_and_jsonl(tmp_path):
  txt = tmp_path / "a.txt"
  txt.write_text("First document,\nstill first.\n\n\nSecond document.\n   \nThird.")
  jsonl = tmp_path / "b.jsonl"
  jsonl.write_text('{"text": "from json", "id": 1}\n\n{"text": "héllo wörld"}\n')
  assert read_text_files([txt, jsonl]) == [
      "First document, still first.", "Second document.", "Third.", "from json", "héllo wörld"]
  other = tmp_path / "c.jsonl"
  other.write_text('{"body": "custom field"}\n')
  assert read_text_files(other, text_field="body") == ["custom field"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "no documents"),
    ("blank.txt", b"  \n\n \n", "no documents"),
    ("latin1.txt", b"caf\xe9 au lait", "not valid UTF-8 \\(byte offset 3"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "line 2: not valid JSON"),
    ("field.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "line 2: no 'text' field"),
    ("empty.jsonl", b"", "no documents"),
    ("notes.md", b"# hi", "unsupported file type"),
])
def test_file_errors_name_the_file(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message) as error:
    read_text_files([path])
  assert str(path) in str(error.value)


def test_missing_file_is_reported_before_reading_others(tmp_path):
  good = tmp_path / "good.txt"
  good.write_text("text")
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    read_text_files([good, tmp_path / "missing.txt"])
  with pytest.raises(ValueError, match="no paths"):
    read_text_files([])


# ----------------------------------------------------------------------------------------------------------------
# tensorflow-datasets, prepared offline in array_record format (no TensorFlow installed)

TINY_TEXTS = [f"tiny document number {i}: {'words ' * i}".strip() for i in range(7)]


def _tiny_builder_class():
  import tensorflow_datasets as tfds

  # skip_registration: tfds_source reads the prepared files alone, and a second definition cannot collide.
  class SwitchxTinyTexts(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Seven short texts for the round trip; split 'validation' holds the first two."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      # DatasetInfo directly: dataset_info_from_configs looks for metadata files next to the builder's code.
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text(), "number": np.int64}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(TINY_TEXTS), "validation": self._generate_examples(TINY_TEXTS[:2])}

    def _generate_examples(self, texts):
      for i, text in enumerate(texts):
        yield i, {"text": text, "number": i}

  return SwitchxTinyTexts


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  _tiny_builder_class()(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_round_trip(tiny_tfds_dir):
  train = tfds_source("switchx_tiny_texts", tiny_tfds_dir, split="train")
  assert len(train) == len(TINY_TEXTS)
  assert sorted(train) == sorted(TINY_TEXTS)  # tfds shuffles records when it writes them.
  assert all(isinstance(text, str) for text in train)
  assert sorted(tfds_source("switchx_tiny_texts:1.0.0", tiny_tfds_dir, split="validation")) == sorted(
      TINY_TEXTS[:2])


def test_tfds_errors(tiny_tfds_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tfds_source("switchx_tiny_texts", tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="not prepared.*tfds build"):
    tfds_source("c4/en", tiny_tfds_dir)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    tfds_source("switchx_tiny_texts:9.9.9", tiny_tfds_dir)
  with pytest.raises(ValueError, match="no split 'test'"):
    tfds_source("switchx_tiny_texts", tiny_tfds_dir, split="test")
  with pytest.raises(ValueError, match="no feature 'body'"):
    tfds_source("switchx_tiny_texts", tiny_tfds_dir, text_key="body")


def test_tfds_tfrecord_datasets_are_refused(tiny_tfds_dir, tmp_path):
  # A dataset prepared as tfrecord (tfds' default) needs TensorFlow; fake one by relabelling a copy.
  shutil.copytree(tiny_tfds_dir / "switchx_tiny_texts", tmp_path / "switchx_tiny_texts")
  info = tmp_path / "switchx_tiny_texts" / "1.0.0" / "dataset_info.json"
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(ValueError, match="prepared as tfrecord.*file_format=array_record"):
    tfds_source("switchx_tiny_texts", tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

SMALL_TEXTS = [topics[name] for name in sorted(topics)][:40]  # ~200 KB of the language reference.


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return train_tokenizer(SMALL_TEXTS, 300, cache_dir=tmp_path_factory.mktemp("tokenizer"))


def test_t5_special_ids_and_sentinels(tokenizer):
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
  assert tokenizer.sp_size == 300 and tokenizer.vocab_size == 400
  assert tokenizer.sentinel(0) == 399 and tokenizer.sentinel(1) == 398 and tokenizer.sentinel(99) == 300
  with pytest.raises(ValueError):
    tokenizer.sentinel(100)
  assert tokenizer.decode([tokenizer.sentinel(0), tokenizer.sentinel(7)]) == "<extra_id_0><extra_id_7>"


def test_round_trip_of_ordinary_text(tokenizer):
  text = "The quick brown fox jumps over the lazy dog, then returns 42 values (see the reference)."
  ids = tokenizer.encode(text)
  assert ids and min(ids) > 2 and max(ids) < tokenizer.sp_size  # No pad, eos, unk or sentinel.
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids + [tokenizer.eos_id, tokenizer.pad_id]) == text
  assert tokenizer.encode_batch([text, "x"]) == [ids, tokenizer.encode("x")]
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tokenizer.decode([tokenizer.vocab_size])


def test_training_is_cached(tokenizer, private_cache, monkeypatch):
  trained = train_tokenizer(SMALL_TEXTS, 300)  # Into the default cache, which SWITCHX_CACHE moved.
  assert trained.encode("some text here") == tokenizer.encode("some text here")  # Training is deterministic.
  model_files = list((private_cache / "tokenizer").glob("*.model"))
  assert len(model_files) == 1

  def no_training(**kwargs):
    raise AssertionError("trained again instead of reading the cache")

  monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
  again = train_tokenizer(SMALL_TEXTS, 300)
  assert again.encode("some text here") == tokenizer.encode("some text here")
  with pytest.raises(AssertionError, match="trained again"):
    train_tokenizer(SMALL_TEXTS[:-1], 300)  # Other texts: another cache key.


def test_save_and_load(tokenizer, tmp_path):
  tokenizer.save(tmp_path / "t.model")
  loaded = Tokenizer.load(tmp_path / "t.model", extra_ids=10)
  assert loaded.vocab_size == 310 and loaded.encode("hello") == tokenizer.encode("hello")


def test_load_rejects_non_t5_models(tmp_path):
  with pytest.raises(FileNotFoundError):
    Tokenizer.load(tmp_path / "missing.model")
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="junk.model.*not a serialized SentencePiece"):
    Tokenizer.load(tmp_path / "junk.model")
  # SentencePiece's own defaults are unk=0, bos=1, eos=2, no pad: not T5's layout.
  spm.SentencePieceTrainer.train(sentence_iterator=iter(SMALL_TEXTS[:5]), model_prefix=str(tmp_path / "plain"),
                                 vocab_size=100, minloglevel=2, max_sentence_length=100_000)
  with pytest.raises(ValueError, match="pad_id=-1, eos_id=2"):
    Tokenizer.load(tmp_path / "plain.model")


def test_training_errors():
  with pytest.raises(ValueError, match="no text"):
    train_tokenizer(["", "  "], 300)
  with pytest.raises(ValueError, match="smaller vocab_size"):
    train_tokenizer(["tiny corpus"], 5000)


def test_cache_files_are_written_atomically(tmp_path):
  corpus.write_atomically(tmp_path / "sub" / "f.json", json.dumps([1]).encode())
  assert json.loads((tmp_path / "sub" / "f.json").read_text()) == [1]
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f.json"]  # No temp file left behind.

"""The training pipeline: determinism, exact resumption from get_state, disjoint process shares, early errors."""

import json

import numpy as np
import pytest
from pydoc_data.topics import topics

from switchx.data.packing import BATCH_KEYS
from switchx.data.pipeline import CausalPipeline, Pipeline, split_documents
from switchx.data.span_corruption import inverse
from switchx.data.tokenizer import train_tokenizer

DOCUMENTS = [topics[name] for name in sorted(topics)][:40]  # ~200 KB of the language reference.
SHORT_DOCUMENTS = [doc[:1000] for doc in DOCUMENTS[:3]]  # ~1000 tokens: epochs of a few batches.
LENGTHS = dict(inputs_length=32, targets_length=12)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("SWITCHX_CACHE", str(tmp_path / "switchx-cache"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return train_tokenizer(DOCUMENTS, 300, cache_dir=tmp_path_factory.mktemp("tokenizer"))


def take(pipeline, n):
  return [next(pipeline) for _ in range(n)]


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_have_the_documented_layout(tokenizer):
  batch = next(Pipeline(DOCUMENTS, tokenizer, batch_size=4, seed=0, **LENGTHS))
  assert set(batch) == set(BATCH_KEYS)
  for key, array in batch.items():
    length = 32 if key.startswith("encoder") else 12
    assert array.shape == (4, length), key
    assert array.dtype == (np.float32 if key == "decoder_loss_weights" else np.int32), key
  # Every row holds real text ending in EOS, with sentinels from the top of the vocabulary.
  assert np.all(batch["encoder_segment_ids"][:, 0] == 1)
  assert batch["decoder_target_tokens"][0, 0] == tokenizer.vocab_size - 1


def test_same_seed_same_batches(tokenizer):
  first = take(Pipeline(DOCUMENTS, tokenizer, batch_size=4, seed=3, **LENGTHS), 5)
  again = take(Pipeline(DOCUMENTS, tokenizer, batch_size=4, seed=3, **LENGTHS), 5)
  other = take(Pipeline(DOCUMENTS, tokenizer, batch_size=4, seed=4, **LENGTHS), 5)
  assert_same_batches(first, again)
  assert not np.array_equal(first[0]["encoder_input_tokens"], other[0]["encoder_input_tokens"])


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("batches_before", [0, 1, 3, 7])
def test_restored_pipeline_continues_exactly(tokenizer, pack, batches_before):
  # A small corpus, so that the 8 batches after the checkpoint cross one or more epoch boundaries.
  def make():
    return Pipeline(SHORT_DOCUMENTS, tokenizer, batch_size=3, seed=11, pack=pack, inputs_length=64,
                    targets_length=24)

  original = make()
  assert original.examples_per_epoch < 3 * 8
  take(original, batches_before)
  state = json.loads(json.dumps(original.get_state()))  # Must survive JSON, as in a checkpoint.
  restored = make()
  restored.set_state(state)
  assert_same_batches(take(original, 8), take(restored, 8))
  assert original.get_state()["epoch"] >= 1


def test_state_counts_epochs(tokenizer):
  pipeline = Pipeline(SHORT_DOCUMENTS, tokenizer, batch_size=1, seed=0, pack=False, **LENGTHS)
  take(pipeline, pipeline.examples_per_epoch + 2)
  state = pipeline.get_state()
  assert (state["epoch"], state["position"]) == (1, 2)


def chunks_of(tokens, raw_length):
  return sorted(tuple(tokens[i:i + raw_length].tolist()) for i in range(0, len(tokens), raw_length))


@pytest.mark.parametrize("process_count", [1, 3])
def test_process_shares_are_disjoint_and_cover_an_epoch(tokenizer, process_count):
  tokens = np.concatenate([tokenizer.encode(doc) for doc in SHORT_DOCUMENTS])
  seen = []
  for process_index in range(process_count):
    pipeline = Pipeline(SHORT_DOCUMENTS, tokenizer, batch_size=1, seed=5, pack=False,
                        process_index=process_index, process_count=process_count, **LENGTHS)
    for batch in take(pipeline, pipeline.examples_per_epoch):  # One example per batch: one epoch.
      inputs = batch["encoder_input_tokens"][0][batch["encoder_segment_ids"][0] == 1]
      targets = batch["decoder_target_tokens"][0][batch["decoder_segment_ids"][0] == 1]
      seen.append(tuple(inverse(inputs, targets).tolist()))
  raw_length = pipeline.raw_length
  assert sorted(seen) == chunks_of(tokens, raw_length)  # Each chunk exactly once over all processes.


def test_packed_batches_use_every_example_once_per_epoch(tokenizer):
  tokens = np.concatenate([tokenizer.encode(doc) for doc in SHORT_DOCUMENTS])
  # Full chunks fill their rows (the raw length is chosen so); only the stream's short last chunk can share one.
  pipeline = Pipeline(SHORT_DOCUMENTS, tokenizer, batch_size=2, seed=2, **LENGTHS)
  seen = []
  while pipeline.get_state()["epoch"] == 0:
    batch = next(pipeline)
    for row in range(2):
      segment_ids = batch["encoder_segment_ids"][row]
      for segment in range(1, segment_ids.max() + 1):
        inputs = batch["encoder_input_tokens"][row][segment_ids == segment]
        targets = batch["decoder_target_tokens"][row][batch["decoder_segment_ids"][row] == segment]
        seen.append(tuple(inverse(inputs, targets).tolist()))
  # The last batch may already hold the first examples of epoch 1; take those out before comparing.
  for position in range(pipeline.get_state()["position"]):
    seen.remove(tuple(inverse(*pipeline.example(1, position)).tolist()))
  assert sorted(seen) == chunks_of(tokens, pipeline.raw_length)


def test_examples_can_be_regenerated_independently(tokenizer):
  pipeline = Pipeline(DOCUMENTS, tokenizer, batch_size=2, seed=1, **LENGTHS)
  later = pipeline.example(epoch=3, position=10)
  take(pipeline, 4)
  again = pipeline.example(epoch=3, position=10)
  np.testing.assert_array_equal(later[0], again[0])
  np.testing.assert_array_equal(later[1], again[1])


@pytest.mark.parametrize("documents, kwargs, message", [
    ([], {}, "no documents"),
    (["", "   "], {}, "not enough for one example"),
    (DOCUMENTS, dict(batch_size=0), "batch_size"),
    (DOCUMENTS, dict(inputs_length=2), "too short"),
    (DOCUMENTS, dict(targets_length=2), "too short"),
    (DOCUMENTS, dict(seed=-1), "seed"),
    (DOCUMENTS, dict(process_index=2, process_count=2), "process_index"),
    (DOCUMENTS, dict(noise_density=1.5), "noise_density"),
    (DOCUMENTS, dict(inputs_length=2048, targets_length=2048), "sentinels"),
    (["x y"], dict(process_count=2), "fewer than process_count"),
])
def test_bad_settings_fail_early(tokenizer, documents, kwargs, message):
  settings = dict(batch_size=2, seed=0, **LENGTHS) | kwargs
  with pytest.raises(ValueError, match=message):
    Pipeline(documents, tokenizer, **settings)


def test_state_from_another_configuration_is_refused(tokenizer):
  state = Pipeline(DOCUMENTS, tokenizer, batch_size=2, seed=0, **LENGTHS).get_state()
  other = Pipeline(DOCUMENTS, tokenizer, batch_size=2, seed=1, **LENGTHS)
  with pytest.raises(ValueError, match="seed: saved 0, now 1"):
    other.set_state(state)


def test_split_documents():
  documents = [f"doc {i}" for i in range(100)]
  train, held_out = split_documents(documents, 0.1, seed=0)
  assert len(held_out) == 10 and sorted(train + held_out) == sorted(documents)
  assert (train, held_out) == split_documents(documents, 0.1, seed=0)
  assert held_out != split_documents(documents, 0.1, seed=1)[1]
  assert train == [doc for doc in documents if doc in train]  # Original order kept.
  with pytest.raises(ValueError, match="eval_fraction"):
    split_documents(documents, 1.0, seed=0)
  with pytest.raises(ValueError, match="keep some"):
    split_documents(["only one"], 0.5, seed=0)


def test_causal_pipeline_rows_are_next_token_pairs_of_the_stream_and_resume_exactly(tokenizer):
  """Decoder-only batches: each row is a contiguous chunk of the token stream, the targets the inputs shifted by
  one; a pipeline restored from get_state continues with the same batches."""
  pipeline = CausalPipeline(DOCUMENTS, tokenizer, batch_size=4, seed=0, **LENGTHS)
  first = next(pipeline)
  length = LENGTHS["inputs_length"] + LENGTHS["targets_length"]
  assert set(first) == {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"}
  assert first["decoder_input_tokens"].shape == (4, length) and first["decoder_loss_weights"].min() == 1.0
  np.testing.assert_array_equal(first["decoder_input_tokens"][:, 1:], first["decoder_target_tokens"][:, :-1])
  stream = np.concatenate([np.asarray(ids) for ids in tokenizer.encode_batch(DOCUMENTS)])
  row = np.concatenate([first["decoder_input_tokens"][0], first["decoder_target_tokens"][0, -1:]])
  starts = [i for i in range(0, len(stream) - length, length + 1) if np.array_equal(stream[i:i + length + 1], row)]
  assert len(starts) == 1                                        # a chunk of the stream, at a chunk boundary
  state = pipeline.get_state()
  assert state["objective"] == "causal_lm"
  second = next(pipeline)
  again = CausalPipeline(DOCUMENTS, tokenizer, batch_size=4, seed=0, **LENGTHS)
  again.set_state(state)
  assert_same_batches([next(again)], [second])

"""Packing: segments never mix, nothing is lost or duplicated, shifts and weights respect segment borders."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchx.data.packing import BATCH_KEYS, RowPacker, pack_examples

INPUTS_LENGTH, TARGETS_LENGTH = 24, 12


def make_examples(lengths):
  """Examples whose tokens name their example: token = 100 * (k + 1) + j, so any mixing is visible."""
  return [(np.arange(n_in) + 100 * (k + 1), np.arange(n_tg) + 100 * (k + 1) + 50)
          for k, (n_in, n_tg) in enumerate(lengths)]


def unpack(batch):
  """(row, inputs, targets) of every segment, checking per-segment invariants along the way."""
  segments = []
  for row in range(batch["encoder_input_tokens"].shape[0]):
    encoder_ids, decoder_ids = batch["encoder_segment_ids"][row], batch["decoder_segment_ids"][row]
    count = encoder_ids.max()
    assert decoder_ids.max() == count
    for side, ids in (("encoder", encoder_ids), ("decoder", decoder_ids)):
      used = ids > 0
      # Segment ids are 1, 2, ... in order, each one contiguous, and padding (0) only comes at the end.
      assert used[:used.sum()].all()
      assert np.all(np.diff(ids[used]) >= 0)
      np.testing.assert_array_equal(np.unique(ids[used]), np.arange(1, count + 1))
      # Padding is all zeros.
      for key in (f"{side}_positions", "encoder_input_tokens" if side == "encoder" else "decoder_target_tokens"):
        assert np.all(batch[key][row][~used] == 0)
    for s in range(1, count + 1):
      in_segment, tg_segment = encoder_ids == s, decoder_ids == s
      inputs = batch["encoder_input_tokens"][row][in_segment]
      targets = batch["decoder_target_tokens"][row][tg_segment]
      np.testing.assert_array_equal(batch["encoder_positions"][row][in_segment], np.arange(len(inputs)))
      np.testing.assert_array_equal(batch["decoder_positions"][row][tg_segment], np.arange(len(targets)))
      # Decoder inputs: 0 at the segment start, then the segment's own targets shifted by one.
      np.testing.assert_array_equal(batch["decoder_input_tokens"][row][tg_segment],
                                    np.concatenate([[0], targets[:-1]]))
      segments.append((row, inputs, targets))
  return segments


def check_packing(examples, batch):
  assert set(batch) == set(BATCH_KEYS)
  for key, array in batch.items():
    assert array.dtype == (np.float32 if key == "decoder_loss_weights" else np.int32), key
  np.testing.assert_array_equal(batch["decoder_loss_weights"], batch["decoder_segment_ids"] > 0)
  segments = unpack(batch)
  # Each segment is exactly one example (inputs and targets of the same one): nothing lost, nothing twice.
  found = sorted(int(inputs[0]) // 100 - 1 for _, inputs, _ in segments)
  assert found == list(range(len(examples)))
  for row, inputs, targets in segments:
    k = int(inputs[0]) // 100 - 1
    np.testing.assert_array_equal(inputs, examples[k][0])
    np.testing.assert_array_equal(targets, examples[k][1])
  return segments


def test_docstring_example():
  batch = pack_examples([(np.array([5, 1]), np.array([7, 8, 1])), (np.array([6, 1]), np.array([9, 1]))], 6, 6)
  assert batch["decoder_target_tokens"].tolist() == [[7, 8, 1, 9, 1, 0]]
  assert batch["decoder_input_tokens"].tolist() == [[0, 7, 8, 0, 9, 0]]
  assert batch["decoder_segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0]]
  assert batch["decoder_positions"].tolist() == [[0, 1, 2, 0, 1, 0]]
  assert batch["decoder_loss_weights"].tolist() == [[1, 1, 1, 1, 1, 0]]
  assert batch["encoder_input_tokens"].tolist() == [[5, 1, 6, 1, 0, 0]]
  assert batch["encoder_segment_ids"].tolist() == [[1, 1, 2, 2, 0, 0]]


def test_first_fit_in_arrival_order():
  # Rows of 10: example 0 (6) opens row 0, 1 (6) opens row 1, 2 (4) fills row 0, 3 (3) goes to row 1.
  examples = make_examples([(6, 1), (6, 1), (4, 1), (3, 1)])
  segments = check_packing(examples, pack_examples(examples, 10, 10))
  rows = {int(inputs[0]) // 100 - 1: row for row, inputs, _ in segments}
  assert rows == {0: 0, 1: 1, 2: 0, 3: 1}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, INPUTS_LENGTH), st.integers(1, TARGETS_LENGTH)), min_size=1, max_size=30))
def test_packed_rows_keep_examples_apart(lengths):
  examples = make_examples(lengths)
  batch = pack_examples(examples, INPUTS_LENGTH, TARGETS_LENGTH)
  check_packing(examples, batch)
  assert batch["encoder_input_tokens"].shape[0] <= len(examples)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, INPUTS_LENGTH), st.integers(1, TARGETS_LENGTH)), min_size=1, max_size=30))
def test_unpacked_mode_puts_one_example_per_row(lengths):
  examples = make_examples(lengths)
  batch = pack_examples(examples, INPUTS_LENGTH, TARGETS_LENGTH, pack=False)
  assert batch["encoder_input_tokens"].shape == (len(examples), INPUTS_LENGTH)
  assert np.all(batch["encoder_segment_ids"].max(axis=1) == 1)
  check_packing(examples, batch)


def test_row_packer_refuses_when_full():
  packer = RowPacker(2, 10, 10)
  examples = make_examples([(8, 2), (8, 2), (2, 8), (5, 5)])
  assert [packer.add(*example) for example in examples[:3]] == [True, True, True]
  assert not packer.add(*examples[3])  # No row has 5 free input slots, and both rows are open.
  assert packer.num_examples == 3
  batch = packer.batch()
  assert batch["encoder_input_tokens"].shape == (2, 10)
  check_packing(examples[:3], batch)


def test_unopened_rows_are_padding():
  packer = RowPacker(4, 10, 10)
  packer.add(np.array([5, 1]), np.array([6, 1]))
  batch = packer.batch()
  assert batch["encoder_segment_ids"][1:].sum() == 0 and batch["decoder_loss_weights"][1:].sum() == 0


@pytest.mark.parametrize("inputs_length, targets_length", [(3, 10), (10, 3)])
def test_too_long_examples_are_rejected(inputs_length, targets_length):
  with pytest.raises(ValueError, match="does not fit"):
    pack_examples(make_examples([(4, 4)]), inputs_length, targets_length)


def test_empty_examples_are_rejected():
  with pytest.raises(ValueError, match="empty"):
    pack_examples([(np.array([], int), np.array([1]))], 10, 10)

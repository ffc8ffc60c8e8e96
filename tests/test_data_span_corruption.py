"""Span corruption: T5's lengths, noise statistics, sentinel layout, exact inversion, argument checks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchx.data.span_corruption import (corrupted_lengths, inverse, noise_counts, noise_span_mask,
                                          raw_length_for, span_corrupt)

VOCAB_SIZE = 1000  # Token ids below are < 500, so up to 500 sentinels never collide with them.


def random_tokens(rng, length):
  return rng.integers(3, 500, size=length)


def test_t5_lengths_for_512_inputs():
  # T5's random_spans_helper: 512 inputs with density 0.15, mean span 3 -> 568 raw tokens, 114 targets.
  assert raw_length_for(512) == 568
  assert corrupted_lengths(568) == (512, 114)
  assert raw_length_for(512, 114) == 568


def test_raw_length_respects_a_short_targets_length():
  raw = raw_length_for(512, 100)
  assert corrupted_lengths(raw)[1] <= 100
  assert corrupted_lengths(raw + 1)[1] > 100 or corrupted_lengths(raw + 1)[0] > 512


def test_corrupted_lengths_match_span_corrupt():
  rng = np.random.default_rng(0)
  for length in [2, 3, 10, 57, 568]:
    inputs, targets = span_corrupt(random_tokens(rng, length), VOCAB_SIZE, rng)
    assert (len(inputs), len(targets)) == corrupted_lengths(length)


def test_noise_fraction_and_mean_span_length():
  """Over many examples of varied length, ~15% of tokens are noise in spans of mean length ~3.

  The counts are deterministic per length (round(length * 0.15) noise tokens, round(noise / 3) spans), so the
  only deviation from 0.15 and 3 is rounding, which averages out over varied lengths: tolerance 0.005 for the
  fraction and 0.1 for the span length.
  """
  rng = np.random.default_rng(1)
  noise, total, spans = 0, 0, 0
  for length in rng.integers(50, 1000, size=500):
    mask = noise_span_mask(int(length), 0.15, 3.0, rng)
    noise += mask.sum()
    total += length
    spans += np.sum(mask & ~np.concatenate([[False], mask[:-1]]))
  assert abs(noise / total - 0.15) < 0.005
  assert abs(noise / spans - 3.0) < 0.1


def test_noise_positions_are_spread_uniformly():
  """Away from the edges each position is noise with probability ~0.15.

  2000 masks: a position's frequency has standard deviation sqrt(0.15 * 0.85 / 2000) ~ 0.008; the tolerance of
  0.04 is 5 standard deviations, so the test is not flaky yet catches a biased segmentation.
  """
  rng = np.random.default_rng(2)
  masks = np.stack([noise_span_mask(100, 0.15, 3.0, rng) for _ in range(2000)])  # [2000, 100]
  frequency = masks.mean(axis=0)  # [100]
  assert np.all(np.abs(frequency[10:90] - 0.15) < 0.04)
  assert not masks[:, 0].any()  # T5 starts with a non-noise span ...
  assert masks[:, -1].all()  # ... and ends with a noise span.


def test_sentinels_unique_and_descending():
  rng = np.random.default_rng(3)
  for _ in range(50):
    inputs, targets = span_corrupt(random_tokens(rng, 200), VOCAB_SIZE, rng)
    input_sentinels = inputs[inputs >= 500]
    target_sentinels = targets[targets >= 500]
    expected = VOCAB_SIZE - 1 - np.arange(len(input_sentinels))
    np.testing.assert_array_equal(input_sentinels, expected)
    np.testing.assert_array_equal(target_sentinels, expected)
    assert targets[0] == VOCAB_SIZE - 1
    assert inputs[-1] == 1 and targets[-1] == 1
    assert inputs.dtype == np.int32 and targets.dtype == np.int32


def test_small_example_by_hand():
  tokens = np.arange(10, 20)
  mask = noise_span_mask(10, 0.3, 1.5, np.random.default_rng(0))
  inputs, targets = span_corrupt(tokens, 100, np.random.default_rng(0), 0.3, 1.5)
  # Rebuild the expected outputs from the mask in plain Python.
  expected_inputs, expected_targets, sentinel = [], [], 99
  for i, token in enumerate(tokens):
    starts_span = mask[i] and (i == 0 or not mask[i - 1])
    if starts_span:
      expected_inputs.append(sentinel)
      expected_targets.append(sentinel)
      sentinel -= 1
    (expected_targets if mask[i] else expected_inputs).append(int(token))
  assert inputs.tolist() == expected_inputs + [1]
  assert targets.tolist() == expected_targets + [1]


def test_deterministic_given_the_generator():
  tokens = np.arange(3, 303)
  first = span_corrupt(tokens, VOCAB_SIZE, np.random.default_rng(7))
  again = span_corrupt(tokens, VOCAB_SIZE, np.random.default_rng(7))
  other = span_corrupt(tokens, VOCAB_SIZE, np.random.default_rng(8))
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  assert not np.array_equal(first[0], other[0])


@settings(max_examples=200, deadline=None)
@given(length=st.integers(2, 300), density=st.floats(0.01, 0.99), mean_span=st.floats(1.0, 10.0),
       seed=st.integers(0, 2**32 - 1))
def test_properties_over_random_settings(length, density, mean_span, seed):
  rng = np.random.default_rng(seed)
  tokens = random_tokens(rng, length)
  mask = noise_span_mask(length, density, mean_span, np.random.default_rng(seed))
  num_noise, num_spans = noise_counts(length, density, mean_span)
  assert mask.shape == (length,) and mask.sum() == num_noise
  assert np.sum(mask & ~np.concatenate([[False], mask[:-1]])) == num_spans
  assert not mask[0] and mask[-1]

  inputs, targets = span_corrupt(tokens, VOCAB_SIZE, np.random.default_rng(seed), density, mean_span)
  assert (len(inputs), len(targets)) == corrupted_lengths(length, density, mean_span)
  np.testing.assert_array_equal(inverse(inputs, targets), tokens)
  assert np.all(np.diff(inputs[inputs >= 500]) == -1)


@pytest.mark.parametrize("kwargs, parameter", [
    (dict(length=1), "length"),
    (dict(length=0), "length"),
    (dict(length=10, noise_density=0.0), "noise_density"),
    (dict(length=10, noise_density=1.0), "noise_density"),
    (dict(length=10, noise_density=-0.1), "noise_density"),
    (dict(length=10, mean_noise_span_length=0.5), "mean_noise_span_length"),
])
def test_bad_arguments_name_the_parameter(kwargs, parameter):
  with pytest.raises(ValueError, match=parameter):
    noise_span_mask(rng=np.random.default_rng(0), **kwargs)


def test_too_short_sequences_and_lengths_raise():
  with pytest.raises(ValueError, match="length"):
    span_corrupt(np.array([5]), VOCAB_SIZE, np.random.default_rng(0))
  with pytest.raises(ValueError, match="too short"):
    raw_length_for(2)
  with pytest.raises(ValueError, match="too short"):
    raw_length_for(512, targets_length=2)
  assert raw_length_for(3, 3) == 2  # The shortest lengths that still work.


def test_tokens_colliding_with_sentinels_raise():
  with pytest.raises(ValueError, match="sentinel"):
    span_corrupt(np.array([3, 4, 5, 99, 6, 7]), 100, np.random.default_rng(0))

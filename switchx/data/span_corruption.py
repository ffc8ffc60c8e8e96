"""T5's span-corruption objective, in numpy.

A random 15% of the tokens, grouped in spans of mean length 3, is dropped from the input; each dropped span is
replaced by one sentinel, and the target lists the sentinels each followed by the span it stands for:

    tokens   a b c d e f g h
    mask       ^ ^     ^          (noise = b c, f)
    inputs   a S0 d e S1 g h EOS
    targets  S0 b c S1 f EOS

Sentinels count down from the end of the vocabulary: S0 = vocab_size - 1, S1 = vocab_size - 2, ...
"""

from __future__ import annotations

import numpy as np

EOS_ID = 1


def _check_noise_parameters(noise_density: float, mean_noise_span_length: float) -> None:
  if not 0.0 < noise_density < 1.0:
    raise ValueError(f"noise_density must be in (0, 1), got {noise_density}.")
  if not mean_noise_span_length >= 1.0:
    raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}.")


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
  """(number of noise tokens, number of noise spans) for a sequence of `length` tokens.

  Both are at least 1; at least one non-noise token stays, and there are never more noise spans than non-noise
  tokens (every noise span is preceded by a non-noise span).
  """
  if length < 2:
    raise ValueError(f"length must be >= 2 for span corruption (one noise and one kept token), got {length}.")
  _check_noise_parameters(noise_density, mean_noise_span_length)
  num_noise = min(max(round(length * noise_density), 1), length - 1)
  num_spans = max(round(num_noise / mean_noise_span_length), 1)
  num_spans = min(num_spans, length - num_noise)
  return num_noise, num_spans


def corrupted_lengths(length: int, noise_density: float = 0.15,
                      mean_noise_span_length: float = 3.0) -> tuple[int, int]:
  """(inputs length, targets length), EOS included, after corrupting `length` tokens."""
  num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
  inputs_length = (length - num_noise) + num_spans + 1  # Kept tokens, one sentinel per span, EOS.
  targets_length = num_noise + num_spans + 1  # Dropped tokens, one sentinel per span, EOS.
  return inputs_length, targets_length


def raw_length_for(inputs_length: int, targets_length: int | None = None, noise_density: float = 0.15,
                   mean_noise_span_length: float = 3.0) -> int:
  """The longest raw token sequence whose corrupted inputs fit `inputs_length` (and targets `targets_length`).

  With inputs_length=512 and T5's defaults this is 568, whose targets need 114 tokens. Shorter raw sequences
  fit too (the corrupted lengths never decrease as the raw length grows).
  """
  _check_noise_parameters(noise_density, mean_noise_span_length)
  max_targets = targets_length if targets_length is not None else float("inf")

  def fits(length):
    inputs, targets = corrupted_lengths(length, noise_density, mean_noise_span_length)
    return inputs <= inputs_length and targets <= max_targets

  if not fits(2):
    shortest = corrupted_lengths(2, noise_density, mean_noise_span_length)
    raise ValueError(
        f"inputs_length={inputs_length}, targets_length={targets_length} are too short for span corruption: "
        f"even 2 raw tokens need {shortest[0]} input and {shortest[1]} target positions."
    )
  # Exponential then binary search for the last length that fits; fits() is monotone in the length.
  low, high = 2, 4
  while fits(high):
    low, high = high, high * 2
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  return low


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Splits `num_items` into `num_segments` random positive lengths (uniformly over all such splits)."""
  # Choosing num_segments - 1 distinct cut points among the num_items - 1 gaps between items.
  cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False) + 1)
  return np.diff(np.concatenate([[0], cuts, [num_items]]))  # [num_segments]


def noise_span_mask(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """Boolean mask [length], True on noise tokens.

  Non-noise and noise spans alternate, starting with non-noise and ending with noise, as in T5.
  """
  if rng is None:
    raise ValueError("noise_span_mask needs rng=np.random.Generator; a fixed generator keeps it reproducible.")
  num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)  # [num_spans]
  kept_lengths = _random_segmentation(length - num_noise, num_spans, rng)  # [num_spans]
  span_lengths = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)  # [2 * num_spans]: kept, noise, ...
  span_is_noise = np.tile([False, True], num_spans)  # [2 * num_spans]
  return np.repeat(span_is_noise, span_lengths)  # [length]


def span_corrupt(tokens: np.ndarray, vocab_size: int, rng: np.random.Generator, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0, eos_id: int = EOS_ID) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) int32 for the raw `tokens` [length] (no EOS; one is appended to both outputs).

  `vocab_size` is the full vocabulary size, sentinels included; the k-th span (k = 0, 1, ...) gets sentinel
  `vocab_size - 1 - k`. The tokens themselves must lie below the sentinels used.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be one sequence [length], got shape {tokens.shape}.")
  mask = noise_span_mask(len(tokens), noise_density, mean_noise_span_length, rng)  # [length]
  span_starts = mask & ~np.concatenate([[False], mask[:-1]])  # [length]: first token of each noise span
  num_spans = int(span_starts.sum())
  lowest_sentinel = vocab_size - num_spans
  if tokens.max() >= lowest_sentinel:
    raise ValueError(f"token id {tokens.max()} collides with the sentinels [{lowest_sentinel}, {vocab_size}); "
                     "is vocab_size the full vocabulary size including extra_ids?")
  sentinels = vocab_size - np.cumsum(span_starts)  # [length]: the sentinel of the span each token is in

  # Inputs: kept tokens, and the sentinel in place of each span's first token; the rest of each span goes.
  inputs = np.where(span_starts, sentinels, tokens)[~mask | span_starts]
  # Targets: the noise tokens, with each span's sentinel inserted before the span's first token.
  targets = np.insert(tokens[mask], np.flatnonzero(span_starts[mask]), sentinels[span_starts])
  eos = np.array([eos_id])
  return (np.concatenate([inputs, eos]).astype(np.int32), np.concatenate([targets, eos]).astype(np.int32))


def inverse(inputs: np.ndarray, targets: np.ndarray, eos_id: int = EOS_ID) -> np.ndarray:
  """The raw tokens that `span_corrupt` turned into (inputs, targets)."""
  inputs, targets = np.asarray(inputs).tolist(), np.asarray(targets).tolist()
  if inputs[-1:] != [eos_id] or targets[-1:] != [eos_id]:
    raise ValueError("inputs and targets must both end with EOS.")
  inputs, targets = inputs[:-1], targets[:-1]
  first_sentinel = targets[0]

  # Split targets into spans at the sentinels; they appear in order first_sentinel, first_sentinel - 1, ...
  spans, next_sentinel = {}, first_sentinel
  for token in targets:
    if token == next_sentinel:
      current = spans[token] = []
      next_sentinel -= 1
    else:
      current.append(token)

  tokens, next_sentinel = [], first_sentinel
  for token in inputs:
    if token == next_sentinel:
      tokens.extend(spans[token])
      next_sentinel -= 1
    else:
      tokens.append(token)
  return np.array(tokens, dtype=np.int32)

"""The greedy pick's fast path gives torch.argmax's indices, ties and NaN included."""

import pytest
import torch

from engine.sampling import ARGMAX_CHUNK, greedy_tokens


@pytest.mark.parametrize("vocab", [1, 7, ARGMAX_CHUNK, 3 * ARGMAX_CHUNK, 3 * ARGMAX_CHUNK + 5, 202048])
def test_greedy_tokens_equal_argmax_on_random_logits(vocab):
    logits = torch.randn(9, vocab, generator=torch.Generator().manual_seed(vocab))
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))


def test_ties_pick_the_first_maximum_across_and_inside_chunks():
    vocab = 4 * ARGMAX_CHUNK + 3
    logits = torch.zeros(5, vocab)
    logits[0, [3, ARGMAX_CHUNK + 1, vocab - 1]] = 2.0  # inside the first chunk, later ones too
    logits[1, [ARGMAX_CHUNK + 9, 3 * ARGMAX_CHUNK]] = 1.0  # across chunks
    logits[2, [vocab - 2, vocab - 1]] = 5.0  # only in the short last chunk
    logits[3] = float("-inf")  # nothing but -inf: index 0
    logits[4, ARGMAX_CHUNK - 1] = logits[4, ARGMAX_CHUNK] = 3.0  # on a chunk boundary
    expected = [3, ARGMAX_CHUNK + 9, vocab - 2, 0, ARGMAX_CHUNK - 1]
    assert greedy_tokens(logits).tolist() == logits.argmax(-1).tolist() == expected


def test_nan_counts_as_the_maximum_as_in_argmax():
    vocab = 3 * ARGMAX_CHUNK + 1
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    logits[0, 2 * ARGMAX_CHUNK + 7] = float("nan")
    logits[1, [vocab - 1]] = float("nan")
    logits[2, [5, 70]] = float("nan")
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))

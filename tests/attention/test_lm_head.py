"""The lm_head product: oneDNN's prepacked weight on a CPU in fp32, the checkpoint's [V, H] elsewhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attention.lm_head import LmHead

VOCAB, HIDDEN = 5003, 64  # a vocabulary that no block size divides


def _weight(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0)) / 8).to(dtype)


def test_fp32_on_a_cpu_is_prepacked_and_gives_the_linear_product():
    """One row takes the column blocks (the vocabulary padded to whole blocks), more rows the
    prepacked weight: both give the product."""
    weight = _weight()
    head = LmHead(weight)
    assert head.prepacked  # the torch this project pins has oneDNN: the fast path is what runs
    g = torch.Generator().manual_seed(1)
    for rows in (1, 2, 7, 33):
        hidden = torch.randn(rows, HIDDEN, generator=g)
        logits = head(hidden)
        assert logits.shape == (rows, VOCAB) and logits.dtype == torch.float32
        reference = hidden.double() @ weight.double().t()
        torch.testing.assert_close(logits.double(), reference, atol=1e-5, rtol=0)
        assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_a_strided_batch_and_an_empty_one():
    head = LmHead(_weight())
    hidden = torch.randn(6, 2 * HIDDEN)[:, ::2]  # rows picked out of a wider tensor
    assert torch.equal(head(hidden), head(hidden.contiguous()))
    assert head(torch.empty(0, HIDDEN)).shape == (0, VOCAB)


def test_bf16_keeps_the_checkpoint_layout_and_the_linear_product():
    """bf16 logits are bitwise `nn.Linear`'s (what transformers computes), widened to fp32."""
    weight = _weight(torch.bfloat16)
    head = LmHead(weight)
    assert not head.prepacked
    hidden = torch.randn(3, HIDDEN).to(torch.bfloat16)
    logits = head(hidden)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, F.linear(hidden, weight).float())
    reference = hidden.double() @ weight.double().t()
    torch.testing.assert_close(logits.double(), reference, atol=2**-10, rtol=2**-7)  # about one bf16 rounding

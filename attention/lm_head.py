"""The lm_head product, hidden [N, H] -> logits [N, V], with its weight in the forms the device
multiplies fastest.

MKL's `x @ w` on the plain [H, V] weight is slow for a few rows. oneDNN, given the weight once
at load to repack into the blocked layout its matrix product reads (the op pair torch's own
compiler uses for frozen linear layers: `mkldnn._reorder_linear_weight`, then
`mkldnn._linear_pointwise` at every step), is quick for a few rows and slow for one. A single
row (a lone stream's decode step) goes fastest as one batched product over 32 blocks of columns
(`torch.bmm`), each thread taking whole blocks rather than every thread a share of each product.
So on a CPU in fp32 the head keeps the two forms, oneDNN's and the column blocks. Measured on
the 2-core machine this was written on, bench-maverick's [256, 202048] weight, median of 30
each, alternating, with a 64 MiB pass between products to empty the caches as a step's layers
would:

| rows | `x @ w` | this head |
|---|---|---|
| 1 | 8.0 ms | 7.3 ms (blocks) |
| 2 | 11.7 ms | 10.7 ms (oneDNN) |
| 8 | 21.0 ms | 12.0 ms (oneDNN) |
| 32 | 26.1 ms | 20.9 ms (oneDNN) |

The second form costs a second copy of the weight (207 MB on bench-maverick). For two rows or
more the logits were bitwise those of `x @ w` here (the same sums in the same order); for one
row they differ in the last bits (1.4e-6 here), as two BLAS kernels do. Elsewhere (a GPU, bf16,
a torch built without oneDNN) there is one form, the checkpoint's own [V, H], and the product is
`F.linear`, the one transformers' `nn.Linear` computes. (A copy laid out as [H, V] once gave bf16
logits one rounding away from it on another CPU, whose BLAS takes a different kernel for each
layout.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import host_memory

ROW_BLOCKS = 32  # one-row products on a CPU: blocks of columns (of 6314 at Llama 4's vocabulary)


class LmHead:
    """The output projection, from the checkpoint's [V, H] weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.vocab_size = weight.shape[0]
        self._plain = self._packed = self._blocks = None
        if _packs(weight):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
            self._blocks = _column_blocks(weight, ROW_BLOCKS)
        else:
            self._plain = weight  # [V, H], for `F.linear`

    @property
    def prepacked(self) -> bool:
        return self._packed is not None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] fp32."""
        if self._plain is not None:
            return F.linear(hidden, self._plain).float()
        if hidden.shape[0] >= 2:
            return torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), self._packed, None, "none", [], "")
        if hidden.shape[0] == 0:  # oneDNN refuses an empty batch
            return hidden.new_empty((0, self.vocab_size))
        # one row: a product per block of columns, the threads taking whole blocks
        blocks, h, width = self._blocks.shape
        out = torch.bmm(hidden.expand(blocks, 1, h), self._blocks)  # [blocks, 1, width]
        return out.view(1, blocks * width)[:, : self.vocab_size]


def _column_blocks(weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """[V, H] -> [blocks, H, ceil(V / blocks)]: block i holds columns i*width.. of the [H, V]
    product, the last one padded with zero columns."""
    vocab, hidden = weight.shape
    width = -(-vocab // blocks)
    padded = weight.new_zeros(blocks * width, hidden)
    padded[:vocab] = weight
    return host_memory.copy(padded.view(blocks, width, hidden).transpose(1, 2))  # read cold at each step


def _packs(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )

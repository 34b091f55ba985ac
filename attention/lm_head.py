"""The lm_head product, hidden [N, H] -> logits [N, V], with its weight in the forms the device
multiplies fastest.

MKL's `x @ w` on the plain [H, V] weight is quick for one row and slow for a few. oneDNN, given
the weight once at load to repack into the blocked layout its matrix product reads (the op pair
torch's own compiler uses for frozen linear layers: `mkldnn._reorder_linear_weight`, then
`mkldnn._linear_pointwise` at every step), is quick for a few rows and a little slower for one.
So on a CPU in fp32 the head keeps both forms, and a product of one row (a lone stream's decode
step) takes the plain one. Measured on the 2-core machine this was written on, bench-maverick's
[256, 202048] weight, median of 30 each, alternating, with a 64 MiB pass between products to
empty the caches as a step's layers would:

| rows | `x @ w` | oneDNN, prepacked |
|---|---|---|
| 1 | 8.9 ms | 9.7 ms |
| 2 | 13.1 ms | 10.6 ms |
| 8 | 23.6 ms | 12.6 ms |
| 32 | 28.4 ms | 22.4 ms |

The second form costs a second copy of the weight (207 MB on bench-maverick). For two rows or
more the logits were bitwise those of `x @ w` here (the same sums in the same order). Elsewhere (a
GPU, bf16, a torch built without oneDNN) there is only the plain form.
"""

from __future__ import annotations

import torch


class LmHead:
    """The output projection, from the checkpoint's [V, H] weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.vocab_size = weight.shape[0]
        self._plain = weight.t().clone(memory_format=torch.contiguous_format)  # [H, V], for `x @ w`
        self._packed = None  # the oneDNN form, where there is one
        if _packs(weight):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())

    @property
    def prepacked(self) -> bool:
        return self._packed is not None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] fp32."""
        if self._packed is None or hidden.shape[0] < 2:  # oneDNN also refuses an empty batch
            return (hidden @ self._plain).float()
        return torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), self._packed, None, "none", [], "")


def _packs(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )

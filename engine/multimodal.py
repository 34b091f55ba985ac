"""A request's image features placed in its prompt, and the slice of them each chunk carries.

Early fusion: the features of a request's images (one row per `<|patch|>` token of its prompt,
in prompt order) replace those tokens' embeddings before layer 0. A chunk of the prompt gets the
rows of the patch positions it covers, so chunked prefill may cut through an image anywhere, and
a recompute (after preemption, or on another rank) gets exactly the same rows again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attention.paged import ImageRows


@dataclass(frozen=True)
class RequestImages:
    """positions: int64 [P], the sorted prompt positions of `<|patch|>`; embeds: [P, H]."""

    positions: torch.Tensor
    embeds: torch.Tensor

    @classmethod
    def place(
        cls, prompt_token_ids: Sequence[int], features: torch.Tensor, image_token_id: int
    ) -> RequestImages:
        """Pair features [P, H] with the prompt's P `<|patch|>` positions; a count that differs
        (a prompt not expanded for these images) is a ValueError saying both numbers."""
        prompt = torch.tensor(prompt_token_ids, dtype=torch.long)
        positions = torch.nonzero(prompt == image_token_id).flatten()
        if features.ndim != 2 or features.shape[0] != positions.numel():
            raise ValueError(
                f"the prompt has {positions.numel()} <|patch|> tokens but its images give "
                f"{features.shape[0] if features.ndim else 0} feature rows"
            )
        return cls(positions, features)

    def rows(self, start: int, end: int) -> ImageRows | None:
        """The rows of positions [start, end), with offsets from `start`; None if there are none."""
        lo = int(torch.searchsorted(self.positions, start))
        hi = int(torch.searchsorted(self.positions, end))
        if lo == hi:
            return None
        return ImageRows(self.positions[lo:hi] - start, self.embeds[lo:hi])

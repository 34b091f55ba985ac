"""Paged KV storage and the per-step attention metadata built from block tables.

One pool of blocks serves every layer: a block holds `block_size` positions of K and V for one
layer of one sequence. Block tables (per sequence, per layer) come from the KV cache manager
(`engine.kv_cache`), which frees chunked layers' blocks that fall behind the current chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch


def kv_bytes_per_block(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one block of one layer."""
    return 2 * block_size * num_kv_heads * head_dim * dtype.itemsize


class KVPool:
    """K and V storage on one device: [num_blocks, block_size, Nkv, D] each."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.device = device or torch.device("cpu")
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)

    @property
    def bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.block_size, self.k.shape[2], self.k.shape[3], self.k.dtype)

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [T, Nkv, D] at flat slots [T] (block * block_size + offset)."""
        self.k.view(-1, *self.k.shape[2:])[slot_mapping] = k
        self.v.view(-1, *self.v.shape[2:])[slot_mapping] = v

    def gather(self, key_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key_blocks [B, NB] -> keys, values [B, NB*block_size, Nkv, D]."""
        b, nb = key_blocks.shape
        keys = self.k[key_blocks].reshape(b, nb * self.block_size, *self.k.shape[2:])
        values = self.v[key_blocks].reshape(b, nb * self.block_size, *self.v.shape[2:])
        return keys, values


@dataclass(frozen=True)
class ImageRows:
    """Image features that take the place of some tokens' embeddings in a chunk (early fusion)."""

    offsets: torch.Tensor  # [R] int64, index into the chunk's token_ids
    embeds: torch.Tensor  # [R, H] projected vision features


@dataclass(frozen=True)
class SeqChunk:
    """The tokens one sequence computes this step: positions [start_pos, start_pos + len(token_ids))."""

    request_id: str
    token_ids: Sequence[int]
    start_pos: int
    image_rows: ImageRows | None = None  # features for the chunk's `<|patch|>` tokens


@dataclass(frozen=True)
class LayerMeta:
    slot_mapping: torch.Tensor  # [T] flat KV slot of each new token
    key_blocks: torch.Tensor  # [B, NB] blocks to read (0 where unused; masked by key_valid)
    key_pos: torch.Tensor  # [B, NB*block_size] position of each gathered key
    key_valid: torch.Tensor  # [B, NB*block_size] key exists and is readable


@dataclass(frozen=True)
class AttentionBatch:
    token_ids: torch.Tensor  # [T] int64, sequences laid out one after another
    positions: torch.Tensor  # [T] int64
    q_index: torch.Tensor  # [B, Qmax] flat token index of each padded query (-1 = padding)
    q_valid: torch.Tensor  # [B, Qmax]
    q_pos: torch.Tensor  # [B, Qmax] (padding rows: -1, so they see nothing)
    q_flat_index: torch.Tensor  # [T] where each token sits in the flattened [B * Qmax] queries
    layers: tuple[LayerMeta, ...]
    last_token_index: torch.Tensor  # [B] flat index of each sequence's last token this step
    image_index: torch.Tensor | None = None  # [R] int64 flat token index of each image row
    image_embeds: torch.Tensor | None = None  # [R, H] replace the embeddings of those tokens

    def to(self, device: torch.device) -> AttentionBatch:
        """The same batch on `device`, in one host-to-device copy: every index tensor is packed
        into one int64 buffer on the host, copied, and cut back into views (booleans compared
        back). Image features, floats, go on their own."""
        if device.type == "cpu":
            return self
        skip = ("layers", "image_embeds")
        top = [f.name for f in fields(self) if f.name not in skip and getattr(self, f.name) is not None]
        per_layer = [f.name for f in fields(LayerMeta)]
        parts = [getattr(self, n) for n in top] + [getattr(m, n) for m in self.layers for n in per_layer]
        flat = torch.cat([t.reshape(-1).long() for t in parts]).to(device, non_blocking=True)
        moved = iter(_unpack(flat, parts))
        batch = {n: next(moved) for n in top}
        layers = tuple(LayerMeta(**{n: next(moved) for n in per_layer}) for _ in self.layers)
        embeds = None if self.image_embeds is None else self.image_embeds.to(device, non_blocking=True)
        return replace(self, layers=layers, image_embeds=embeds, **batch)


def _unpack(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for t in like:
        piece = flat[start : start + t.numel()].view(t.shape)
        out.append(piece != 0 if t.dtype == torch.bool else piece)
        start += t.numel()
    return out


def build_batch(
    chunks: Sequence[SeqChunk],
    block_table: Callable[[str, int], list[int]],
    key_start: Callable[[int, int], int],
    num_layers: int,
    block_size: int,
    device: torch.device | None = None,
) -> AttentionBatch:
    """Flatten chunks into one batch on `device` (default CPU). `block_table(request_id, layer)`
    gives a layer's blocks (-1 where freed); `key_start(layer, start_pos)` is the first position
    a layer's queries can see (0 for full attention, the chunk start for chunked layers).

    The metadata is built on the host from the scheduler's plain ints and reaches a GPU in one
    copy (`AttentionBatch.to`)."""
    lengths = [len(c.token_ids) for c in chunks]
    q_max = max(lengths, default=0)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    token_ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
    positions = (
        torch.cat([torch.arange(c.start_pos, c.start_pos + n) for c, n in zip(chunks, lengths, strict=True)])
        if chunks
        else torch.zeros(0, dtype=torch.long)
    )
    j = torch.arange(q_max)[None, :]
    lens = torch.tensor(lengths, dtype=torch.long)[:, None]
    q_valid = j < lens
    q_index = torch.where(q_valid, offsets[:-1, None] + j, -1)
    starts = torch.tensor([c.start_pos for c in chunks], dtype=torch.long)[:, None]
    q_pos = torch.where(q_valid, starts + j, -1)
    # row-major order of the valid queries is token order (sequences one after another); found
    # here on the host, so the decoder never needs a data-dependent boolean index on the device
    q_flat_index = torch.nonzero(q_valid.reshape(-1)).reshape(-1)
    layers = tuple(
        _layer_meta(chunks, lengths, block_table, layer, key_start, block_size) for layer in range(num_layers)
    )
    image_index, image_embeds = _image_rows(chunks, offsets)
    batch = AttentionBatch(
        token_ids,
        positions,
        q_index,
        q_valid,
        q_pos,
        q_flat_index,
        layers,
        offsets[1:] - 1,
        image_index,
        image_embeds,
    )
    return batch if device is None else batch.to(device)


def _image_rows(
    chunks: Sequence[SeqChunk], offsets: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The chunks' image rows as flat token indices [R] and features [R, H] (None without any)."""
    with_images = [(int(offsets[i]), c.image_rows) for i, c in enumerate(chunks) if c.image_rows is not None]
    if not with_images:
        return None, None
    index = torch.cat([rows.offsets.to(torch.long).cpu() + base for base, rows in with_images])
    return index, torch.cat([rows.embeds for _, rows in with_images])


def _layer_meta(
    chunks: Sequence[SeqChunk],
    lengths: Sequence[int],
    block_table: Callable[[str, int], list[int]],
    layer: int,
    key_start: Callable[[int, int], int],
    block_size: int,
) -> LayerMeta:
    slots: list[int] = []
    rows: list[list[int]] = []
    first_blocks: list[int] = []
    ends: list[int] = []
    for c, n in zip(chunks, lengths, strict=True):
        table = block_table(c.request_id, layer)
        end = c.start_pos + n
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(c.start_pos, end))
        first = key_start(layer, c.start_pos) // block_size
        rows.append(table[first : (end - 1) // block_size + 1])
        first_blocks.append(first)
        ends.append(end)
    nb = max((len(r) for r in rows), default=0)
    blocks = torch.tensor([r + [-1] * (nb - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), nb)
    key_pos = (
        torch.tensor(first_blocks, dtype=torch.long)[:, None] * block_size
        + torch.arange(nb * block_size)[None, :]
    )
    readable = (blocks >= 0).repeat_interleave(block_size, dim=1)
    key_valid = readable & (key_pos < torch.tensor(ends, dtype=torch.long)[:, None])
    return LayerMeta(torch.tensor(slots, dtype=torch.long), blocks.clamp(min=0), key_pos, key_valid)

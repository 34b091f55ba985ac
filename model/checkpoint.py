"""Reading Hugging Face Llama 4 checkpoints: safetensors and JSON only, nothing unpickled.

The safetensors container is simple (an 8-byte header length, a JSON header of
`{name: {dtype, shape, data_offsets}}`, then raw little-endian data), so this module reads it
itself with positioned reads. That is what lets an expert worker read only the rows of the
fused `experts.gate_up_proj` [E, H, 2I] / `experts.down_proj` [E, I, H] tensors that belong to
its own experts, and lets a test count the bytes that were actually read.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig
from model.device import check_dtype_name, resolve_dtype
from model.vision_config import VisionConfig

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

# Tensor-name prefixes of the two layouts transformers writes.
_LAYOUTS = (
    ("language_model.model.", "language_model.lm_head."),  # Llama4ForConditionalGeneration
    ("model.", "lm_head."),  # Llama4ForCausalLM
)
# Vision tensors are named `vision_model.*` and `multi_modal_projector.*` at the top level, or one
# level down (`model.vision_model.*`) where a checkpoint wraps the towers in a base model.
VISION_NAMES = ("vision_model.", "multi_modal_projector.")
_VISION_LAYOUTS = ("", "model.")
_VISION_PROBE = "vision_model.patch_embedding.linear.weight"


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, has a wrong shape, or is not readable."""


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def row_bytes(self) -> int:
        rows = self.shape[0] if self.shape else 1
        return (self.end - self.begin) // max(rows, 1)


class SafetensorsFile:
    """One `.safetensors` file, read with `os.pread`. `bytes_read` counts tensor bytes read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bytes_read = 0
        self._fd = os.open(path, os.O_RDONLY)
        try:
            (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, header_len, 8))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            os.close(self._fd)
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
        header.pop("__metadata__", None)
        base = 8 + header_len
        self.entries: dict[str, _Entry] = {}
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            self.entries[name] = _Entry(
                _DTYPES[info["dtype"]], tuple(info["shape"]), base + begin, base + end
            )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _read(self, offset: int, size: int) -> bytearray:
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        while done < size:
            chunk = os.pread(self._fd, size - done, offset + done)
            if not chunk:
                raise CheckpointError(f"{self.path}: file is truncated")
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
        self.bytes_read += size
        return buf

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        return _to_tensor(self._read(e.begin, e.end - e.begin), e.dtype, e.shape)

    def read_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows `rows` of dimension 0 of `name`, reading only their bytes (runs coalesced)."""
        e = self.entries[name]
        if not e.shape:
            raise CheckpointError(f"tensor {name!r} is a scalar; it has no rows")
        bad = [r for r in rows if not 0 <= r < e.shape[0]]
        if bad:
            raise CheckpointError(f"tensor {name!r} has {e.shape[0]} rows; asked for rows {bad}")
        parts = []
        for start, count in _runs(rows):
            raw = self._read(e.begin + start * e.row_bytes, count * e.row_bytes)
            parts.append(_to_tensor(raw, e.dtype, (count, *e.shape[1:])))
        order = torch.tensor(_run_order(rows), dtype=torch.long)
        return torch.cat(parts)[order] if parts else torch.empty((0, *e.shape[1:]), dtype=e.dtype)


def _to_tensor(raw: bytearray, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    if not raw:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted unique rows grouped into (start, count) runs of consecutive indices."""
    runs: list[tuple[int, int]] = []
    for r in sorted(set(rows)):
        if runs and runs[-1][0] + runs[-1][1] == r:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((r, 1))
    return runs


def _run_order(rows: Sequence[int]) -> list[int]:
    """Index into the sorted unique rows for each requested row, in request order."""
    position = {r: i for i, r in enumerate(sorted(set(rows)))}
    return [position[r] for r in rows]


class CheckpointReader:
    """A Hugging Face Llama 4 checkpoint directory.

    Tensor names given to `tensor()` are canonical, without the layout prefix:
    `embed_tokens.weight`, `layers.{i}.self_attn.q_proj.weight`, `norm.weight`, `lm_head.weight`,
    and for the vision tower `vision_model.*`, `multi_modal_projector.*`.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        self.config = ModelConfig.from_file(self.directory)
        self.vision_config = VisionConfig.from_file(self.directory)  # None: text only
        self._files: dict[str, SafetensorsFile] = {}
        self._where = self._weight_map()
        self._model_prefix, self._head_prefix = self._detect_layout()
        self._vision_prefix = next((p for p in _VISION_LAYOUTS if p + _VISION_PROBE in self._where), None)

    @property
    def has_vision(self) -> bool:
        """The checkpoint has a vision config and its tower's tensors."""
        return self.vision_config is not None and self._vision_prefix is not None

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).exists()})
            if missing:
                raise CheckpointError(f"{self.directory}: shards named by the index do not exist: {missing}")
            return dict(weight_map)
        single = self.directory / "model.safetensors"
        if not single.exists():
            raise CheckpointError(
                f"{self.directory}: no model.safetensors or model.safetensors.index.json "
                "(only safetensors is read)"
            )
        return dict.fromkeys(self._file(single.name).entries, single.name)

    def _detect_layout(self) -> tuple[str, str]:
        for model_prefix, head_prefix in _LAYOUTS:
            if f"{model_prefix}embed_tokens.weight" in self._where:
                return model_prefix, head_prefix
        raise CheckpointError(
            f"{self.directory}: missing tensor 'language_model.model.embed_tokens.weight' "
            "(or 'model.embed_tokens.weight'); not a Llama 4 text checkpoint"
        )

    def _file(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            path = self.directory / filename
            if not path.exists():
                raise CheckpointError(f"{self.directory}: shard {filename} named by the index does not exist")
            self._files[filename] = SafetensorsFile(path)
        return self._files[filename]

    def _full_name(self, name: str) -> str:
        if name.startswith(VISION_NAMES):
            if self._vision_prefix is None:
                raise CheckpointError(f"{self.directory}: no vision tower (no tensor {_VISION_PROBE!r})")
            return f"{self._vision_prefix}{name}"
        if name == "lm_head.weight":
            return f"{self._head_prefix}weight"
        return f"{self._model_prefix}{name}"

    def _locate(self, name: str, shape: tuple[int, ...]) -> tuple[SafetensorsFile, str]:
        full = self._full_name(name)
        if full not in self._where:
            raise CheckpointError(f"{self.directory}: missing tensor {full!r}")
        f = self._file(self._where[full])
        if full not in f.entries:
            raise CheckpointError(f"{f.path}: missing tensor {full!r} (the index says it is here)")
        if f.entries[full].shape != shape:
            raise CheckpointError(
                f"tensor {full!r} has shape {list(f.entries[full].shape)}, expected {list(shape)}"
            )
        return f, full

    def tensor(
        self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | None = None
    ) -> torch.Tensor:
        """Read a whole tensor, check its shape, put it on `device` (default CPU) in `dtype`."""
        f, full = self._locate(name, tuple(shape))
        return place(f.read(full), dtype, device)

    def expert_rows(
        self,
        layer_idx: int,
        expert_ids: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> ExpertWeights:
        """Only the given experts of one MoE layer: gate_up [n, H, 2I] and down [n, I, H], on
        `device` (default CPU) in `dtype`.

        Reads just those experts' bytes from the fused tensors, never the whole tensor.
        """
        cfg = self.config
        if not cfg.is_moe(layer_idx):
            raise CheckpointError(f"layer {layer_idx} is not a MoE layer (moe_layers={list(cfg.moe_layers)})")
        e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        bad = [x for x in expert_ids if not 0 <= x < e]
        if bad:
            raise CheckpointError(f"layer {layer_idx}: expert ids {bad} out of range [0, {e})")
        prefix = f"layers.{layer_idx}.feed_forward.experts."
        f_gu, gu_name = self._locate(prefix + "gate_up_proj", (e, h, 2 * i))
        f_dn, dn_name = self._locate(prefix + "down_proj", (e, i, h))
        return ExpertWeights(
            gate_up=place(f_gu.read_rows(gu_name, expert_ids), dtype, device),
            down=place(f_dn.read_rows(dn_name, expert_ids), dtype, device),
        )

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self._files.values())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorDict:
    """Weights already in memory (canonical names, as `model.synthetic.random_weights` makes
    them) behind the reading half of `CheckpointReader`'s interface: what builds an engine from
    tensors made on a GPU without writing a checkpoint. Shapes are checked as the reader checks
    them; tensors already on `device` in `dtype` are used as they are (no copy)."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
        self.config = config
        self.tensors = tensors

    def _get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"missing tensor {name!r}")
        t = self.tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        return t

    def tensor(
        self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | None = None
    ) -> torch.Tensor:
        return self._get(name, tuple(shape)).to(device=device or torch.device("cpu"), dtype=dtype)

    def expert_rows(
        self,
        layer_idx: int,
        expert_ids: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> ExpertWeights:
        cfg = self.config
        e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        prefix = f"layers.{layer_idx}.feed_forward.experts."
        device = device or torch.device("cpu")
        gate_up = self._get(prefix + "gate_up_proj", (e, h, 2 * i)).to(device=device, dtype=dtype)
        down = self._get(prefix + "down_proj", (e, i, h)).to(device=device, dtype=dtype)
        if list(expert_ids) == list(range(e)):
            return ExpertWeights(gate_up, down)  # all of them, in order: no copy
        ids = torch.tensor(list(expert_ids), dtype=torch.long).to(device)
        return ExpertWeights(gate_up.index_select(0, ids), down.index_select(0, ids))


def place(t: torch.Tensor, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    """The checkpoint's bytes on `device` in `dtype`. To a GPU the stored bytes travel as they
    are (bf16 checkpoints: half the bytes of fp32) and are converted there; no fp32 copy of a
    tensor is ever made on the host for a GPU."""
    if device is None or device.type == "cpu":
        return t.to(dtype)
    return t.to(device).to(dtype)


@dataclass(frozen=True)
class ExpertWeights:
    """Weights of n experts of one layer. gate_up: [n, H, 2I] (gate columns first); down: [n, I, H]."""

    gate_up: torch.Tensor
    down: torch.Tensor


def parse_dtype(name: str) -> torch.dtype:
    """An explicit dtype name (float32, bfloat16, float16 and their short forms); `auto` needs a
    device (`model.device.resolve_dtype`)."""
    if check_dtype_name(name) == "auto":
        raise ValueError("dtype 'auto' depends on the device: use model.device.resolve_dtype")
    return resolve_dtype(name, "cpu")

"""A CUDA device made of CPU memory: proof, on a machine without a GPU, that a computation keeps
every tensor on the device, and a count of what crosses between host and device.

Inside `FakeCuda()`, a tensor made on `cuda:0` (a factory with that device, `.to(cuda:0)`) is a
`CudaTensor`: real CPU data that says `cuda:0`. Ops on it run on that data, so results are the
CPU's exactly, and return `CudaTensor`s. As on a real GPU, an op that mixes a cuda tensor with a
CPU tensor (other than a 0-dim scalar) raises `DeviceMixError`; stricter than CUDA, so does
indexing a cuda tensor with CPU tensors or Python lists (an implicit host-to-device copy). The
context counts host syncs (`.tolist()`, `.item()`, `int()`, `bool()`, copies to the CPU), copies
to the device, and the ops that computed floating-point tensors on the host.

Limits: `torch.tensor(data, device="cuda")` and a bare "cuda" (no index) cannot be faked on a
CPU-only build (they reach CUDA before any dispatch); the project's code uses
`torch.tensor(data).to(device)` and indexed devices. CUDA random generators do not exist here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
_aten = torch.ops.aten


class DeviceMixError(RuntimeError):
    """An op mixed cuda and CPU tensors (a real GPU raises too), or indexed one with the other."""


class CudaTensor(torch.Tensor):
    """CPU data (`inner`) that reports device cuda:0."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> CudaTensor:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            device=CUDA,
            requires_grad=False,
        )

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001
        raise RuntimeError(f"{func}: a CudaTensor is used outside its FakeCuda context")

    def __repr__(self) -> str:
        return f"CudaTensor({self.inner!r})"

    # Python-level entry points that reach the data without dispatching an op
    def tolist(self) -> Any:
        FakeCuda.active().sync("tolist")
        return self.inner.tolist()

    def item(self) -> Any:
        FakeCuda.active().sync("item")
        return self.inner.item()

    def __int__(self) -> int:
        return int(self.item())

    def __index__(self) -> int:
        return int(self.item())

    def __float__(self) -> float:
        return float(self.item())

    def __bool__(self) -> bool:
        return bool(self.item())

    def copy_(self, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        return _aten.copy_.default(self, src, non_blocking)

    def __invert__(self) -> torch.Tensor:
        return torch.bitwise_not(self)

    def __getitem__(self, index: Any) -> torch.Tensor:
        mode = FakeCuda.active()
        inner_index = mode.device_index(index)
        with _disable_current_modes():
            out = self.inner[inner_index]
        mode.record("getitem", True, out.dtype)
        return CudaTensor(out)

    def __setitem__(self, index: Any, value: Any) -> None:
        mode = FakeCuda.active()
        inner_index = mode.device_index(index)
        if isinstance(value, torch.Tensor) and not isinstance(value, CudaTensor) and value.dim() > 0:
            raise DeviceMixError("setitem: writes a CPU tensor into a cuda tensor")
        with _disable_current_modes():
            self.inner[inner_index] = value.inner if isinstance(value, CudaTensor) else value
        mode.record("setitem", True, self.dtype)


@dataclass
class Op:
    name: str
    on_device: bool
    dtype: torch.dtype | None


@dataclass
class FakeCuda:
    """The context (`with FakeCuda() as gpu:`); patch `torch.cuda` with `patch_cuda` first if
    the code asks torch.cuda whether a GPU exists."""

    ops: list[Op] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)  # device -> host reads
    uploads: int = 0  # host -> device copies
    _mode: TorchDispatchMode | None = None
    _current = None

    @classmethod
    def active(cls) -> FakeCuda:
        if cls._current is None:
            raise RuntimeError("a CudaTensor is used outside its FakeCuda context")
        return cls._current

    def __enter__(self) -> FakeCuda:
        self._mode = _Mode(self)
        self._mode.__enter__()
        FakeCuda._current = self
        return self

    def __exit__(self, *exc: object) -> None:
        FakeCuda._current = None
        self._mode.__exit__(*exc)

    @contextmanager
    def off(self) -> Iterator[None]:
        """Plain CPU torch for a while (a reference run); CudaTensors must not be touched there."""
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()

    def sync(self, what: str) -> None:
        self.syncs.append(what)

    def record(self, name: str, on_device: bool, dtype: torch.dtype | None) -> None:
        self.ops.append(Op(name, on_device, dtype))

    def reset(self) -> None:
        self.ops.clear()
        self.syncs.clear()
        self.uploads = 0

    def host_float_ops(self) -> list[str]:
        """Ops that computed floating-point tensors on the host (what should run on the device)."""
        floats = [o for o in self.ops if o.dtype is not None and o.dtype.is_floating_point]
        return [o.name for o in floats if not o.on_device]

    def device_index(self, index: Any) -> Any:
        parts = index if isinstance(index, tuple) else (index,)
        for part in parts:
            if isinstance(part, list):
                raise DeviceMixError(
                    "indexes a cuda tensor with a Python list (a hidden host-to-device copy)"
                )
            if isinstance(part, torch.Tensor) and not isinstance(part, CudaTensor) and part.dim() > 0:
                raise DeviceMixError("indexes a cuda tensor with a CPU tensor (hidden host-to-device copy)")
        return tree_map(lambda a: a.inner if isinstance(a, CudaTensor) else a, index)


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


class _Mode(TorchDispatchMode):
    def __init__(self, ctx: FakeCuda) -> None:
        super().__init__()
        self.ctx = ctx

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        fake = [a for a in flat if isinstance(a, CudaTensor)]
        plain = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, CudaTensor)]
        target = kwargs.get("device")
        if func is _aten._to_copy.default:
            return self._transfer(args[0], kwargs)
        if func is _aten.copy_.default:
            return self._copy(args[0], args[1], kwargs)
        if fake and any(t.dim() > 0 for t in plain):
            raise DeviceMixError(f"{func}: mixes cuda and cpu tensors")
        if _is_cuda(target):
            kwargs["device"] = torch.device("cpu")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        on_device = bool(fake) or _is_cuda(target)
        self.ctx.record(func.__name__, on_device, _dtype_of(out))
        if not on_device:
            return out
        inputs = {id(a.inner): a for a in fake}  # in-place ops hand back their input

        def wrap(o: Any) -> Any:
            if not isinstance(o, torch.Tensor):
                return o
            same = inputs.get(id(o))
            return same if same is not None else CudaTensor(o)

        return tree_map(wrap, out)

    def _transfer(self, src: torch.Tensor, kwargs: dict) -> torch.Tensor:
        target = kwargs.pop("device", None)
        kwargs.pop("non_blocking", None)
        out = _aten._to_copy.default(_unwrap(src), **kwargs, device=torch.device("cpu"))
        on_device = _is_cuda(target) or (target is None and isinstance(src, CudaTensor))
        if isinstance(src, CudaTensor) and not on_device:
            self.ctx.sync("to_cpu")
        elif on_device and not isinstance(src, CudaTensor):
            self.ctx.uploads += 1
        self.ctx.record("_to_copy", on_device, out.dtype)
        return CudaTensor(out) if on_device else out

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if isinstance(dst, CudaTensor) and not isinstance(src, CudaTensor):
            self.ctx.uploads += 1
        elif isinstance(src, CudaTensor) and not isinstance(dst, CudaTensor):
            self.ctx.sync("copy_to_cpu")
        _unwrap(dst).copy_(_unwrap(src))
        self.ctx.record("copy_", isinstance(dst, CudaTensor), dst.dtype)
        return dst


def _unwrap(a: Any) -> Any:
    return a.inner if isinstance(a, CudaTensor) else a


def _dtype_of(out: Any) -> torch.dtype | None:
    flat, _ = tree_flatten(out)
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    return tensors[0].dtype if tensors else None


def patch_cuda(monkeypatch: Any, free_bytes: int = 2**30) -> None:
    """Make `torch.cuda` say one GPU with `free_bytes` free, and let factories name cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 2 * free_bytes))

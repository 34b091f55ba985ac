"""Which device and dtype a process computes on, and how much memory that device has free.

Every tensor of the forward pass lives on one device per process (the attention worker's, the
expert worker's, or the single-process engine's). Devices are always resolved to an indexed
`torch.device` (`cuda:0`, never bare `cuda`), so comparisons and placements are exact.

Compute dtype `auto` is bfloat16 on GPUs and float32 on CPUs.
"""

from __future__ import annotations

import os

import torch

DEVICE_TYPES = ("cpu", "cuda")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_NAMES = ("auto", *_DTYPES)


def check_device_name(name: str) -> str:
    """`cpu`, `cuda` or `cuda:N`; anything else raises ValueError (no CUDA needed to check)."""
    kind, _, index = name.partition(":")
    if kind not in DEVICE_TYPES or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"unknown device {name!r} (allowed: cpu, cuda, cuda:N)")
    return name


def resolve_device(name: str | torch.device) -> torch.device:
    """An indexed device this process can use: `cuda` becomes the current CUDA device. Raises
    ValueError when CUDA is asked for and none is visible."""
    device = torch.device(check_device_name(str(name)))
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} asked for, but no CUDA GPU is visible")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", index)


def check_dtype_name(name: str) -> str:
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r} (allowed: {', '.join(DTYPE_NAMES)})")
    return name


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype: `auto` is bfloat16 on a GPU and float32 on a CPU."""
    check_dtype_name(name)
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return _DTYPES[name]


def free_memory(device: torch.device) -> int:
    """Bytes the device can still give this process: on a GPU what the driver reports free once
    PyTorch's cache has been returned; on a CPU the kernel's MemAvailable."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return _cpu_available()


def _cpu_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); a no-op on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""Which device a step runs on: the block's ``device`` option resolved to one indexed device.

``auto`` is this process's current CUDA device (the first visible GPU unless the process chose
another; ``CUDA_VISIBLE_DEVICES`` decides which GPUs a process sees), else the CPU. ``cuda:N`` is the
N-th visible GPU and ``cpu`` the CPU. An explicit CUDA device that this process cannot see is an
error that names it: a step never silently lands on another GPU or on the CPU.

Every stage of a runner is built and run inside :func:`on_device`, so the kernels that follow the
current device (Triton launches, graph capture, pinned host buffers) use the step's device as well.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Optional

import torch

DEVICE_FORMAT = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class DevicePlacementError(ValueError):
    """A ``device`` value that is malformed or names a device this process cannot use."""


def check_device_value(value: str) -> str:
    """``value`` itself when it is well formed, else an error naming it.

    Example:
        >>> check_device_value("cuda:1")
        'cuda:1'
    """
    if not isinstance(value, str) or not DEVICE_FORMAT.match(value.strip()):
        raise DevicePlacementError(
            f"Invalid value {value!r} for option `device`: expected 'auto', 'cpu', 'cuda' or 'cuda:N' (N = 0, 1, ...)."
        )
    return value.strip()


def resolve_device(requested: str, cuda_count: Optional[int] = None, current: Optional[int] = None) -> torch.device:
    """The indexed device for option value ``requested``.

    ``cuda_count`` (the GPUs this process sees) and ``current`` (its current CUDA device) default to
    what torch reports; the tests pass them in.

    Example:
        >>> resolve_device("auto", cuda_count=0)
        device(type='cpu')
        >>> resolve_device("cuda", cuda_count=2, current=1)
        device(type='cuda', index=1)
    """
    requested = check_device_value(requested)
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "cpu" or (requested == "auto" and cuda_count == 0):
        return torch.device("cpu")
    if cuda_count == 0:
        raise DevicePlacementError(f"`device` {requested!r} asks for a GPU, but this process sees no CUDA device.")
    if requested in ("auto", "cuda"):
        index = torch.cuda.current_device() if current is None else current
    else:
        index = int(requested.split(":")[1])
        if index >= cuda_count:
            raise DevicePlacementError(
                f"`device` {requested!r}: this process sees {cuda_count} CUDA device(s), cuda:0 to "
                f"cuda:{cuda_count - 1} (CUDA_VISIBLE_DEVICES renumbers the GPUs a process sees)."
            )
    return torch.device("cuda", index)


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Makes ``device`` the current CUDA device for the block (nothing on the CPU).

    Example:
        >>> with on_device(torch.device("cpu")):
        ...     pass
    """
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        yield  # already current: the common single-GPU case pays nothing
        return
    with torch.cuda.device(device):
        yield

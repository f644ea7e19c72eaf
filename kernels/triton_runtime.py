"""Where the Triton kernels can run: one answer for every stage that launches them."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``, read by
    triton when the kernels are decorated, so set it before importing them)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: Union[str, torch.device]) -> Optional[str]:
    """None when the kernels can run on ``device``, else why not.

    Example:
        >>> unavailable_reason("cpu") if not interpreting() else None  # doctest: +ELLIPSIS
        'Triton kernels need a CUDA device, or TRITON_INTERPRET=1 on the CPU...'
    """
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "a CUDA device was asked for but CUDA is not available"
    if device.type == "cpu":
        return None if interpreting() else "Triton kernels need a CUDA device, or TRITON_INTERPRET=1 on the CPU (set before import)"
    return f"Triton kernels do not run on {device}"

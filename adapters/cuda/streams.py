"""Making a stage's CUDA stream current for one call, cheaply.

``torch.cuda.device(d)`` plus ``torch.cuda.stream(s)`` cost tens of microseconds of Python per call: both resolve
the current device through several Python calls (``_get_device_index`` with no index asks
``torch.cuda.is_available()`` each time). The stages switch streams on every frame, so they use
:func:`stream_made_current`, which passes int device indexes and calls ``set_stream`` directly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def stream_made_current(stream: "torch.cuda.Stream") -> Iterator["torch.cuda.Stream"]:
    """Make ``stream`` and its device current for the block (this thread only, as torch's
    current stream is per thread); yields the stream that was current on that device before,
    and restores it on exit."""
    index = stream.device_index
    with torch.cuda.device(index):
        previous = torch.cuda.current_stream(index)
        torch.cuda.set_stream(stream)
        try:
            yield previous
        finally:
            torch.cuda.set_stream(previous)


__all__ = ["stream_made_current"]

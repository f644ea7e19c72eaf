"""Optional per-batch timeline for benchmarks: host clocks plus CUDA timing events.

Off by default (``SegmentationRunner.timeline is None``). When a benchmark switches it on, every batch
records: launch start, preprocess submitted, engine submitted (host), preprocess done and engine done
(GPU, through timing events on a side stream that only waits, so it delays nothing), postprocess
done and result ready (host). ``resolve()`` turns it into milliseconds on one clock.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional

import torch


class Timeline:
    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._device = device
        self._entries: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(device=device) if self._cuda else None
        if self._cuda:
            torch.cuda.synchronize(device)  # GPU idle: the base event's GPU time equals this host time
        self._base_host = time.perf_counter()
        self._base_event = self._timing_event_now() if self._cuda else None

    def _timing_event_now(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event

    def _timing_event_after(self, event: Optional[torch.cuda.Event]) -> Optional[torch.cuda.Event]:
        if not self._cuda or event is None:
            return None
        marker = torch.cuda.Event(enable_timing=True)
        self._stream.wait_event(event)
        marker.record(self._stream)
        return marker

    def start(self) -> Dict[str, Any]:
        entry = {"launch_start": time.perf_counter()}
        with self._lock:
            entry["index"] = len(self._entries)
            self._entries.append(entry)
        return entry

    def mark(self, entry: Optional[Dict[str, Any]], name: str) -> None:
        if entry is not None:
            entry[name] = time.perf_counter()

    def mark_gpu(self, entry: Optional[Dict[str, Any]], name: str, event) -> None:
        if entry is not None:
            entry[name] = self._timing_event_after(event)

    def resolve(self) -> List[Dict[str, float]]:
        """Milliseconds since the timeline started, per batch, on the host clock."""
        if self._cuda:
            torch.cuda.synchronize(self._device)
        resolved = []
        for entry in self._entries:
            row: Dict[str, float] = {"index": entry["index"]}
            for name, value in entry.items():
                if isinstance(value, float):
                    row[name] = round((value - self._base_host) * 1e3, 3)
                elif isinstance(value, torch.cuda.Event):
                    row[name] = round(self._base_event.elapsed_time(value), 3)
            resolved.append(row)
        return resolved

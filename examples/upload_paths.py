"""Diagnostic: what a numpy frame's trip to the GPU costs, piece by piece (GPU host only).

    python -m inference_fastpath.examples.upload_paths --sizes 768x576,1920x1080 --out upload_paths.json

For each frame size it times (median ms of N calls, each waited for):

* ``h2d pinned``: one async H2D copy from a pinned buffer (the DMA alone);
* ``h2d pageable``: ``device.copy_(torch.from_numpy(frame))`` (the driver stages it itself);
* ``fill torch`` / ``fill numpy``: the frame copied into pinned memory by torch (intra-op threads)
  or ``np.copyto`` (one thread);
* ``register+h2d``: ``cudaHostRegister`` on the frame's own pages, one H2D copy, unregister;
* ``stream 2 slots``: frames filled and sent back to back through two pinned slots (fill of frame
  k+1 overlaps the DMA of frame k): total / frames.

Prints a table and saves JSON; the numbers decide which upload the preprocess stage uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch


def _median_ms(call: Callable[[], None], iters: int) -> float:
    for _ in range(3):
        call()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def probe_size(width: int, height: int, iters: int) -> Dict[str, float]:
    device = torch.device("cuda")
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    nbytes = frame.nbytes
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    slots = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream()
    flat = torch.from_numpy(frame.reshape(-1))
    rows: Dict[str, float] = {"bytes": nbytes, "torch_threads": torch.get_num_threads()}

    def h2d_pinned() -> None:
        with torch.cuda.stream(stream):
            target.copy_(pinned, non_blocking=True)
        stream.synchronize()

    def h2d_pageable() -> None:
        with torch.cuda.stream(stream):
            target.copy_(flat, non_blocking=True)
        stream.synchronize()

    def fill_torch() -> None:
        pinned.copy_(flat)

    def fill_numpy() -> None:
        np.copyto(pinned.numpy(), frame.reshape(-1))

    cudart = torch.cuda.cudart()

    def register_h2d() -> None:
        pointer = frame.ctypes.data
        cudart.cudaHostRegister(pointer, nbytes, 0)
        with torch.cuda.stream(stream):
            target.copy_(flat, non_blocking=True)
        stream.synchronize()
        cudart.cudaHostUnregister(pointer)

    events = [torch.cuda.Event(), torch.cuda.Event()]
    for event in events:
        event.record(stream)

    def stream_frames(count: int = 16) -> None:
        for index in range(count):
            slot = index % 2
            events[slot].synchronize()
            slots[slot].copy_(flat)
            with torch.cuda.stream(stream):
                target.copy_(slots[slot], non_blocking=True)
                events[slot].record(stream)
        stream.synchronize()

    for name, call in (("h2d pinned", h2d_pinned), ("h2d pageable", h2d_pageable),
                       ("fill torch", fill_torch), ("fill numpy", fill_numpy), ("register+h2d", register_h2d)):
        try:
            rows[name] = _median_ms(call, iters)
        except Exception as error:  # a path the host refuses (e.g. registration) is reported, not fatal
            rows[name] = None
            rows[f"{name} error"] = repr(error)[:200]
    rows["stream 2 slots"] = _median_ms(stream_frames, max(3, iters // 8)) / 16
    check = torch.empty_like(target)
    check.copy_(flat)
    rows["exact"] = bool(torch.equal(check, target))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="768x576,1920x1080,3840x2160")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--out", default="upload_paths.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    results: List[dict] = []
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        row = {"size": size, **probe_size(width, height, args.iters)}
        results.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Diagnostic: host-side cost of the fused postprocess up to the block's ``sv.Detections`` (GPU host).

    python -m inference_fastpath.examples.profile_postprocess --size 1080p --kept 10 --iters 300

Same synthetic outputs as ``kernels/bench_postprocess.py``. Prints the latency distribution of the
RLE and dense block paths (p10/p50/p90/max), the same with Python's garbage collector paused (to see
how much of the tail is collection pauses), and a cProfile of the RLE path.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from inference_fastpath.examples.runtime import configure_environment

configure_environment()


def _distribution(fn: Callable[[], object], iters: int) -> Dict[str, float]:
    for _ in range(20):
        fn()
    samples: List[float] = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    pick = lambda q: round(samples[min(len(samples) - 1, int(q * len(samples)))], 3)  # noqa: E731
    return {"p10": pick(0.1), "p50": round(statistics.median(samples), 3), "p90": pick(0.9), "max": round(samples[-1], 3)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1080p")
    parser.add_argument("--kept", type=int, default=10)
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args(argv)

    import torch

    from inference_fastpath.adapters.stages.contracts import PostprocessRequest, RawOutputs
    from inference_fastpath.adapters.stages.postprocess_fused import FusedPostprocess, make_metadata
    from inference_fastpath.kernels.bench_postprocess import (
        FRAMES,
        NUM_CLASSES,
        THRESHOLD,
        _block_output,
        _outputs,
        _workflow_image,
    )

    device = torch.device("cuda")
    hw = FRAMES[args.size]
    stage = FusedPostprocess(NUM_CLASSES, None, device)
    host = _outputs(args.kept)
    raw = RawOutputs(boxes=host.boxes.to(device), logits=host.logits.to(device), masks=host.masks.to(device))
    meta = [make_metadata(hw)]
    image = _workflow_image(hw)
    paths = {
        fmt: (lambda fmt=fmt: _block_output(stage(raw, meta, PostprocessRequest(THRESHOLD, None, fmt)), image))
        for fmt in ("rle", "dense")
    }
    for name, fn in paths.items():
        print(f"{name} block, {args.size}, {args.kept} kept: {_distribution(fn, args.iters)}")
        gc.disable()
        try:
            print(f"{name} block, gc paused:           {_distribution(fn, args.iters)}")
        finally:
            gc.enable()
        only_stage = lambda fmt=name: stage(raw, meta, PostprocessRequest(THRESHOLD, None, fmt))  # noqa: E731
        print(f"{name} stage only:                {_distribution(only_stage, args.iters)}")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.iters):
        paths["rle"]()
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())

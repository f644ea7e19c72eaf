"""Diagnostic: host-side cost of our fast stages, call by call (GPU host).

    python -m inference_fastpath.examples.benchmarks.profile_stages post --size 1080p --kept 10 --iters 300
    python -m inference_fastpath.examples.benchmarks.profile_stages pre --size 1080p --iters 300

``post``: same synthetic outputs as ``kernels/bench_postprocess.py``; the latency distribution of the
RLE and dense block paths (p10/p50/p90/max), the same with Python's garbage collector paused (to see
how much of the tail is collection pauses), the stage alone, and a cProfile of the RLE path.
``pre``: a numpy BGR frame through ``TritonPreprocess`` until its output is ready (stretch to
312x312), the same for a numpy frame in pinned memory and for a CUDA frame, the host/GPU breakdown
of the numpy and pinned calls, and a cProfile of the numpy (``--profile-pinned``: pinned) call.
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

from inference_fastpath.workflows.running import configure_environment

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


def _print_profile(fn: Callable[[], object], iters: int, rows: int = 25) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iters):
        fn()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)


def profile_preprocess(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from inference_models.models.common.roboflow.model_packages import ImagePreProcessing

    from inference_fastpath.adapters.preprocess.planning import stretch_network_input
    from inference_fastpath.adapters.preprocess.triton import TritonPreprocess
    from inference_fastpath.examples.benchmarks.bench_postprocess import FRAMES

    device = torch.device("cuda")
    height, width = FRAMES[args.size]
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    stage = TritonPreprocess(stretch_network_input(312, 312), ImagePreProcessing(), device, input_color_format="bgr")
    pinned = torch.empty(frame.shape, dtype=torch.uint8, pin_memory=True).numpy()
    pinned[...] = frame
    sources = (("numpy", frame), ("numpy pinned", pinned), ("cuda", torch.from_numpy(frame).to(device)))
    for name, source in sources:
        call = lambda source=source: stage([source]).ready_event.synchronize()  # noqa: E731
        print(f"preprocess {name} {args.size} call-to-ready: {_distribution(call, args.iters)}")
    for name, source in sources[:2]:
        print(f"{name}: ", end="")
        print_preprocess_breakdown(stage, source, args.iters)
    for name, source in sources[1:2] if args.profile_pinned else sources[:1]:
        print(f"cProfile of the {name} call")
        _print_profile(lambda source=source: stage([source]).ready_event.synchronize(), args.iters)


def print_preprocess_breakdown(stage, frame, iters: int) -> None:
    """Median host ms from the call's start to: upload entered / upload returned / call returned /
    output ready; and GPU ms of the H2D copy and of the kernel(s) after it (CUDA events)."""
    import numpy as np
    import torch

    staging, marks, events = stage._staging, {}, {}
    original_upload = staging.upload

    def upload(frames, stream=None):
        marks["upload_in"] = time.perf_counter()
        events["before"] = torch.cuda.Event(enable_timing=True)
        events["before"].record(stream)
        views = original_upload(frames, stream=stream)
        events["after"] = torch.cuda.Event(enable_timing=True)
        events["after"].record(stream)
        marks["upload_out"] = time.perf_counter()
        return views

    staging.upload = upload
    rows = []
    try:
        for index in range(iters + 20):
            start = time.perf_counter()
            batch = stage([frame])
            returned = time.perf_counter()
            end = torch.cuda.Event(enable_timing=True)
            end.record(stage._stream)
            batch.ready_event.synchronize()
            ready = time.perf_counter()
            end.synchronize()
            if index >= 20:
                rows.append([marks["upload_in"] - start, marks["upload_out"] - start, returned - start,
                             ready - start, events["before"].elapsed_time(events["after"]) / 1e3,
                             events["after"].elapsed_time(end) / 1e3])
    finally:
        staging.upload = original_upload
    median = np.median(np.asarray(rows) * 1e3, axis=0).round(3)
    print("median ms: upload entered {}, upload returned {}, call returned {}, ready {}; "
          "GPU: H2D {}, kernel(s) {}".format(*median))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("pre", "post"))
    parser.add_argument("--size", default="1080p")
    parser.add_argument("--kept", type=int, default=10)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--profile-pinned", action="store_true", help="pre: cProfile the pinned-frame call")
    parser.add_argument("--remap", action="store_true",
                        help="post: the class remapping bench_postprocess uses (no-object column removed)")
    args = parser.parse_args(argv)
    if args.stage == "pre":
        profile_preprocess(args)
        return 0

    import torch

    from inference_fastpath.adapters.contracts import PostprocessRequest, RawOutputs
    from inference_fastpath.adapters.postprocess.fused import FusedPostprocess
    from inference_fastpath.adapters.postprocess.synthetic import make_metadata
    from inference_fastpath.examples.benchmarks.bench_postprocess import (
        FRAMES,
        NUM_CLASSES,
        THRESHOLD,
        _block_output,
        _outputs,
        _workflow_image,
    )

    device = torch.device("cuda")
    hw = FRAMES[args.size]
    remap = None
    if args.remap:
        from inference_models.models.common.roboflow.model_packages import ClassNameRemoval
        from inference_models.models.rfdetr.class_remapping import prepare_class_remapping

        names = [f"class_{i}" for i in range(NUM_CLASSES)] + ["__no_object__"]
        removal = ClassNameRemoval(type="class_name_removal", class_name="__no_object__")
        _, remap = prepare_class_remapping(names, [removal], device)
    stage = FusedPostprocess(NUM_CLASSES, remap, device)
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
    _print_profile(paths["rle"], args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())

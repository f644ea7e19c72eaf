"""Host-side profile of one configuration's runner on the clip, outside any pipeline (GPU host).

    python -m inference_fastpath.examples.profile_runner --frames 100 --options mask_output=rle

Runs ``SegmentationRunner.infer`` + the block's output conversion frame by frame, prints the median
wall time of launch (preprocess + engine submit), complete (postprocess incl. its wait) and output,
then the functions with the most own time under cProfile (the wait on the device shows up as
``synchronize``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from typing import Optional, Sequence

from inference_fastpath.examples.runtime import configure_environment

configure_environment()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--options", default="", help="block options, key=value,...")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    import numpy as np
    from inference.core.workflows.execution_engine.entities.base import ImageParentMetadata, WorkflowImageData

    from inference_fastpath.adapters.block_output import to_sv_detections
    from inference_fastpath.adapters.options import FastpathOptions
    from inference_fastpath.adapters.segmentation_runner import RUNNERS
    from inference_fastpath.adapters.stages.contracts import PostprocessRequest
    from inference_fastpath.examples.benchmark import parse_config
    from inference_fastpath.examples.demo_model import build_demo_model, default_clip_path
    from inference_fastpath.examples.video_io import read_frames

    options = parse_config("profile:" + args.options)[1]
    runner = RUNNERS.get(model_id=str(build_demo_model()), options=FastpathOptions.from_values(options))
    print("stages:", [(c.stage, c.selected, c.fallback_reason) for c in runner.choices])
    request = PostprocessRequest(threshold=0.5, max_detections=300, mask_format=options.get("mask_output", "dense"))
    frames = read_frames(default_clip_path(), count=args.frames)
    images = [WorkflowImageData(parent_metadata=ImageParentMetadata(parent_id=str(i)), numpy_image=f)
              for i, f in enumerate(frames)]
    times = {"launch": [], "complete": [], "output": []}

    def one(frame, image):
        t0 = time.perf_counter()
        launched = runner.launch([frame])
        t1 = time.perf_counter()
        detections, _ = runner.complete(launched, request)
        t2 = time.perf_counter()
        to_sv_detections(detections[0], runner.class_names, image, "profile")
        t3 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key].append(value * 1e3)

    for frame, image in list(zip(frames, images))[:10]:  # warm-up: compile, capture
        one(frame, image)
    for values in times.values():
        values.clear()
    profiler = cProfile.Profile()
    profiler.enable()
    for frame, image in zip(frames, images):
        one(frame, image)
    profiler.disable()
    print("median ms:", {k: round(statistics.median(v), 3) for k, v in times.items()},
          "per frame", round(sum(statistics.median(v) for v in times.values()), 3))
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Diagnostic: the host time of the Execution Engine and the steps after ours, with our step's work taken out.

    python -m inference_fastpath.examples.benchmarks.workflow_overhead --workflow annotated --resolution 1920x1080
    python -m inference_fastpath.examples.benchmarks.workflow_overhead --workflow plain --profile

Runs the workflow through ``ExecutionEngine.run`` frame by frame on one thread. Each frame's detections
are computed once first; in the timed passes our step hands those back at once, so what is timed is what
every frame costs besides the model: the engine's own scheduling of each step (a thread-pool hand-over
per wave of steps), input assembly, the visualizations and the output construction. With the Python
threads of a running pipeline this time competes for the interpreter lock, so it bounds the frame rate
of a workflow whatever the GPU does. Runs anywhere (CPU or GPU); ``--profile`` adds cProfile's top
functions of the calling thread.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence

from inference_fastpath.workflows.running import configure_environment

configure_environment()

PIPELINE_STEP_WORKERS = 4  # streamvision's InferencePipeline: execution_engine_thread_pool_workers


@contextmanager
def replayed_step_outputs() -> Iterator[Dict[int, List[Dict[str, Any]]]]:
    """While active, a runner's ``submit`` computes each frame's outputs once (keyed by the frame's
    pixel buffer) and afterwards returns copies of them at once."""
    from inference_fastpath.adapters.runner import SegmentationRunner

    real = SegmentationRunner.submit
    computed: Dict[int, List[Dict[str, Any]]] = {}

    def submit(self, images, inputs, scheduler, step_name=""):
        key = images[0].numpy_image.__array_interface__["data"][0]
        if key not in computed:
            computed[key] = real(self, images, inputs, scheduler, step_name)
        return [dict(outputs) for outputs in computed[key]]

    SegmentationRunner.submit = submit
    try:
        yield computed
    finally:
        SegmentationRunner.submit = real


def measure(workflow_name: str, model: str, frames: Sequence[Any], passes: int = 3,
            profile: bool = False) -> Dict[str, Any]:
    """Median ms per frame of ``ExecutionEngine.run`` with our step's outputs replayed."""
    from inference_fastpath.workflows import FASTPATH, FASTPATH_ANNOTATED, load_workflow
    from inference_fastpath.workflows.running import execution_engine

    workflows = {"plain": FASTPATH, "annotated": FASTPATH_ANNOTATED}
    # a persistent pool, as InferencePipeline gives the engine (without one, each run starts its own threads)
    pool = ThreadPoolExecutor(max_workers=PIPELINE_STEP_WORKERS, thread_name_prefix="workflow-steps")
    engine = execution_engine(load_workflow(workflows[workflow_name]), executor=pool)

    def run_all() -> None:
        for frame in frames:
            engine.run(runtime_parameters={"image": [frame], "model_id": model})

    with replayed_step_outputs():
        run_all()  # computes the detections
        per_frame = []
        for _ in range(passes):
            started = time.perf_counter()
            run_all()
            per_frame.append((time.perf_counter() - started) / len(frames) * 1e3)
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run_all()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    pool.shutdown(wait=True)
    return {"workflow": workflow_name, "frames": len(frames), "passes": passes,
            "ms_per_frame_median": statistics.median(per_frame), "ms_per_frame_min": min(per_frame)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", default="plain,annotated", help="comma list of plain, annotated")
    parser.add_argument("--resolution", default=None, help="resize the frames to WxH, e.g. 1920x1080")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--video", help="video file (default: the trained demo's shapes clip)")
    parser.add_argument("--model", help="package dir (default: the trained demo model)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions of the last pass")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    import cv2

    from inference_fastpath.examples.trained_demo import build_trained_demo_model, default_video_path
    from inference_fastpath.workflows.video_files import read_frames

    model = args.model or str(build_trained_demo_model())
    frames = read_frames(args.video or str(default_video_path()), count=args.frames)
    if not frames:
        parser.error("no frame could be read from the video")
    if args.resolution:
        width, height = (int(v) for v in args.resolution.lower().split("x"))
        frames = [cv2.resize(frame, (width, height)) for frame in frames]
    results = [measure(name, model, frames, args.passes, args.profile) for name in args.workflow.split(",") if name]
    for result in results:
        print(f"{result['workflow']:>10}: ExecutionEngine.run {result['ms_per_frame_median']:.2f} ms/frame "
              f"(min {result['ms_per_frame_min']:.2f}) with our step's outputs replayed, {result['frames']} frames "
              f"of {frames[0].shape[1]}x{frames[0].shape[0]}", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"resolution": f"{frames[0].shape[1]}x{frames[0].shape[0]}", "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

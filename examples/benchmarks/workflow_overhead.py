"""Diagnostic: the host time of the Execution Engine and the steps after ours, with our step's work taken out.

    python -m inference_fastpath.examples.benchmarks.workflow_overhead --workflow annotated --resolution 1920x1080
    python -m inference_fastpath.examples.benchmarks.workflow_overhead --workflow plain --profile
    python -m inference_fastpath.examples.benchmarks.workflow_overhead --workflow plain --batches 1,8,16 --options mask_output=rle

Runs the workflow through ``ExecutionEngine.run`` frame by frame on one thread. Each frame's detections
are computed once first; in the timed passes our step hands those back at once, so what is timed is what
every frame costs besides the model: the engine's own scheduling of each step (a thread-pool hand-over
per wave of steps), input assembly, the visualizations and the output construction. With the Python
threads of a running pipeline this time competes for the interpreter lock, so it bounds the frame rate
of a workflow whatever the GPU does. Runs anywhere (CPU or GPU); ``--profile`` adds cProfile's top
functions of the calling thread. ``--batches`` runs the frames N at a time, as one pipeline over N
sources does, and gives the engine's cost per batch and per frame.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from inference_fastpath.examples.benchmarks.benchmark import parse_config
from inference_fastpath.workflows.running import configure_environment

configure_environment()

PIPELINE_STEP_WORKERS = 4  # streamvision's InferencePipeline: execution_engine_thread_pool_workers


class InlineExecutor(Executor):
    """Runs each submitted step at once on the calling thread. Not something InferencePipeline offers: it
    stands beside the pool to show what the engine's hand-over of every wave of steps to a pool thread costs."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to the caller through the future, as a pool would
            future.set_exception(error)
        return future


@contextmanager
def replayed_step_outputs() -> Iterator[Dict[Tuple[int, ...], List[Dict[str, Any]]]]:
    """While active, a runner's ``submit`` computes each batch's outputs once (keyed by its frames'
    pixel buffers) and afterwards returns copies of them at once."""
    from inference_fastpath.adapters.runner import SegmentationRunner

    real = SegmentationRunner.submit
    computed: Dict[Tuple[int, ...], List[Dict[str, Any]]] = {}

    def submit(self, images, inputs, scheduler, step_name=""):
        key = tuple(image.numpy_image.__array_interface__["data"][0] for image in images)
        if key not in computed:
            computed[key] = real(self, images, inputs, scheduler, step_name)
        return [dict(outputs) for outputs in computed[key]]

    SegmentationRunner.submit = submit
    try:
        yield computed
    finally:
        SegmentationRunner.submit = real


def measure(workflow_name: str, model: str, frames: Sequence[Any], passes: int = 3,
            profile: bool = False, batch: int = 1, options: Optional[Dict[str, Any]] = None,
            steps: str = "pool") -> Dict[str, Any]:
    """Median ms per frame of ``ExecutionEngine.run`` with our step's outputs replayed; ``batch`` frames
    go into each run (the clip is played again from its start to fill the last batch); ``options`` are
    our step's options in the workflow; ``steps="inline"`` runs every step on the calling thread instead of
    InferencePipeline's pool of four (the difference is the engine's hand-over cost).

    Example:
        >>> measure("plain", "path/to/package", frames, batch=16)["ms_per_batch_median"]  # doctest: +SKIP
        4.1
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if not frames:
        raise ValueError("no frames to run")
    if steps not in ("pool", "inline"):
        raise ValueError(f"steps must be 'pool' or 'inline', got {steps!r}")
    from inference_fastpath.workflows import FASTPATH, FASTPATH_ANNOTATED, load_workflow
    from inference_fastpath.workflows.running import execution_engine

    workflows = {"plain": FASTPATH, "annotated": FASTPATH_ANNOTATED}
    # a persistent pool, as InferencePipeline gives the engine (without one, each run starts its own threads)
    pool = (ThreadPoolExecutor(max_workers=PIPELINE_STEP_WORKERS, thread_name_prefix="workflow-steps")
            if steps == "pool" else InlineExecutor())
    engine = execution_engine(load_workflow(workflows[workflow_name], **(options or {})), executor=pool)
    runs = -(-len(frames) // batch)
    played = [frames[i % len(frames)] for i in range(runs * batch)]
    batches = [played[i:i + batch] for i in range(0, len(played), batch)]

    def run_all() -> None:
        for images in batches:
            engine.run(runtime_parameters={"image": list(images), "model_id": model})

    with replayed_step_outputs():
        run_all()  # computes the detections
        per_frame = []
        for _ in range(passes):
            started = time.perf_counter()
            run_all()
            per_frame.append((time.perf_counter() - started) / len(played) * 1e3)
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run_all()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    pool.shutdown(wait=True)
    median = statistics.median(per_frame)
    return {"workflow": workflow_name, "frames": len(played), "batch": batch, "options": dict(options or {}),
            "steps": steps,
            "passes": passes, "ms_per_frame_median": median, "ms_per_frame_min": min(per_frame),
            "ms_per_batch_median": median * batch}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", default="plain,annotated", help="comma list of plain, annotated")
    parser.add_argument("--resolution", default=None, help="resize the frames to WxH, e.g. 1920x1080")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--video", help="video file (default: the trained demo's shapes clip)")
    parser.add_argument("--model", help="package dir (default: the trained demo model)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions of the last pass")
    parser.add_argument("--batches", default="1", help="comma list of frames per run, e.g. 1,8,16 (N sources)")
    parser.add_argument("--steps", default="pool", help="comma list of pool (InferencePipeline's) and inline "
                        "(every step on the calling thread: shows the hand-over's cost)")
    parser.add_argument("--options", default="", help="our step's options, e.g. mask_output=rle,precision=fp16")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        parser.error(f"--batches must be a comma list of integers, got {args.batches!r}")
    if not batches or min(batches) < 1:
        parser.error(f"--batches must list sizes of at least 1, got {args.batches!r}")
    options = parse_config(":" + args.options)[1]
    step_modes = [mode for mode in args.steps.split(",") if mode]
    if not step_modes or set(step_modes) - {"pool", "inline"}:
        parser.error(f"--steps must be a comma list of pool and inline, got {args.steps!r}")

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
    results = [measure(name, model, frames, args.passes, args.profile, batch, options, mode)
               for name in args.workflow.split(",") if name for batch in batches for mode in step_modes]
    for result in results:
        print(f"{result['workflow']:>10} batch {result['batch']:>3} steps {result['steps']:>6}: ExecutionEngine.run "
              f"{result['ms_per_frame_median']:.2f} ms/frame (min {result['ms_per_frame_min']:.2f}), "
              f"{result['ms_per_batch_median']:.2f} ms/batch, with our step's outputs replayed, {result['frames']} "
              f"frames of {frames[0].shape[1]}x{frames[0].shape[0]}", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"resolution": f"{frames[0].shape[1]}x{frames[0].shape[0]}", "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

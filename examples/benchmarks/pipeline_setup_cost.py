"""Diagnostic: which part of a script's setup around ``run_pipeline`` costs the annotated workflow its rate.

``run_video`` and the benchmark harness run the same workflow with the same options through the same
``run_pipeline``, yet on one GPU host ``run_video`` went slower. Each variant below runs in a fresh
process and changes one thing against the plain run::

    python -m inference_fastpath.examples.benchmarks.pipeline_setup_cost --video clip.mp4 --model <package>

``log``: the root logger at INFO (as ``run_video`` sets it); ``pre``: the step's runner built before the
pipeline starts (as the benchmark does); ``pre-thread``: built before it on a thread of its own that then
ends; ``threads1``: torch's intra-op pool cut to one thread (``torch.set_num_threads(1)``); ``cv-threads1``:
the same for OpenCV's pool (``cv2.setNumThreads(1)``: the painters and annotators call OpenCV); ``keep``: every
result kept (as the benchmark does); ``sink``: a sink callback that reads each result's predictions (as
``run_video`` does). Each variant also reports the medians of our step's host stage times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
from typing import Any, Dict, Optional, Sequence

VARIANTS = ("plain", "log", "pre", "pre-thread", "threads1", "cv-threads1", "keep", "sink", "log-sink")
OPTIONS = dict(preprocess="auto", engine="auto", postprocess="auto", precision="fp32", mask_output="compact",
               cuda_graphs=True, pipeline_depth=2, downstream_overlap=True)


def run_variant(variant: str, model: str, video: str, warmup: int, replay: bool = False) -> Dict[str, Any]:
    """The annotated workflow's FPS after ``warmup`` frames with ``variant``'s setup, in this process, and
    the medians of our step's host stage times (``stages_ms``).
    ``replay``: our step computes its first frame's outputs and returns copies of them for every later
    frame, so the model costs nothing and the host's own work shows (for a CPU)."""
    import logging

    from inference_fastpath.workflows.running import configure_environment

    configure_environment()
    if "log" in variant:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from inference_fastpath.workflows import FASTPATH_ANNOTATED, load_workflow
    from inference_fastpath.workflows.running import run_pipeline

    from inference_fastpath.adapters.options import FastpathOptions
    from inference_fastpath.adapters.runner import RUNNERS

    def build() -> None:
        RUNNERS.get(model_id=model, options=FastpathOptions.from_values(OPTIONS))

    if variant == "pre-thread":
        builder = threading.Thread(target=build)
        builder.start()
        builder.join()
    elif "pre" in variant:
        build()
    if variant == "threads1":
        import torch

        torch.set_num_threads(1)
    if variant == "cv-threads1":
        import cv2

        cv2.setNumThreads(1)
    seen = [0]

    def on_result(prediction, frame) -> None:
        seen[0] += len(prediction["predictions"])

    with _first_outputs_replayed() if replay else contextlib.nullcontext():
        run = run_pipeline(video, load_workflow(FASTPATH_ANNOTATED, **OPTIONS), {"model_id": model},
                           warmup_frames=warmup, keep_results="keep" in variant,
                           on_result=on_result if "sink" in variant else None)
    from inference_fastpath.examples.benchmarks.benchmark import stage_medians

    runners = RUNNERS.runners()
    # a replayed run repeats the first frame's stage times: no medians then
    medians = stage_medians(runners[0]) if runners and not replay else {}
    return {"fps": run.fps_after_warmup() or 0.0, "stages_ms": medians}


@contextlib.contextmanager
def _first_outputs_replayed():
    # The stages are replaced, not the step's submit: the schedulers, futures and overlap stay as they run.
    from inference_fastpath.adapters.runner import SegmentationRunner

    real_launch, real_complete, first = SegmentationRunner.launch, SegmentationRunner.complete, {}

    def launch(self, frames):
        if "launched" not in first:
            first["launched"] = real_launch(self, frames)
        return first["launched"]

    def complete(self, launched, request):
        if "completed" not in first:
            first["completed"] = real_complete(self, launched, request)
        return first["completed"]

    SegmentationRunner.launch, SegmentationRunner.complete = launch, complete
    try:
        yield
    finally:
        SegmentationRunner.launch, SegmentationRunner.complete = real_launch, real_complete


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", required=True)
    parser.add_argument("--model", default=None, help="model package dir (default: the trained demo)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per variant")
    parser.add_argument("--out", default="pipeline_setup_cost.json")
    parser.add_argument("--replay", action="store_true",
                        help="our step replays its first frame's outputs: the host's own cost, on any machine")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_variant(args.one, args.model, args.video, args.warmup, args.replay)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    if args.model is None:
        from inference_fastpath.examples.trained_demo import build_trained_demo_model

        args.model = str(build_trained_demo_model())
    results: Dict[str, Optional[float]] = {}
    stages: Dict[str, Dict[str, float]] = {}
    for variant in variants:
        command = [sys.executable, "-m", __spec__.name, "--video", args.video, "--model", args.model,
                   "--warmup", str(args.warmup), "--one", variant] + (["--replay"] if args.replay else [])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            measured = json.loads(lines[-1]) if lines else {}
            results[variant], stages[variant] = measured.get("fps"), measured.get("stages_ms", {})
            error = None if lines else (done.stderr.strip().splitlines() or ["no output"])[-1]
        except subprocess.TimeoutExpired:
            results[variant], error = None, f"still running after {args.timeout} s"
        shown = "n/a" if results[variant] is None else f"{results[variant]:.1f}"
        medians = ", ".join(f"{k} {v:.2f}" for k, v in stages.get(variant, {}).items())
        print(f"{variant:>10}: {shown} fps after {args.warmup} frames" + (f" ({error})" if error else "")
              + (f"; host ms medians: {medians}" if medians else ""), flush=True)
    with open(args.out, "w") as handle:
        json.dump({"video": args.video, "warmup": args.warmup, "replay": args.replay, "fps": results,
                   "stages_ms": stages}, handle, indent=1)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

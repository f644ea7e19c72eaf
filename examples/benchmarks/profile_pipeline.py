"""Diagnostic: where the host time of a whole ``InferencePipeline`` run goes, per thread (GPU host).

    python -m inference_fastpath.examples.benchmarks.profile_pipeline --preset fast-rle-depth2 --frames 120
    python -m inference_fastpath.examples.benchmarks.profile_pipeline --preset fast-depth2 --workflow annotated \
        --model "$(python -m inference_fastpath.examples.trained_demo)" --video examples/data/shapes_clip.mp4 \
        --resolution 1920x1080 --timed

Runs the configuration once unprofiled (warm-up: graph capture, kernel compilation, FPS), then again
with the same runner under yappi, CPU clock, every thread. Prints the FPS of both runs, each thread's
CPU ms per frame (the GIL serialises Python, so their sum against the wall time per frame says whether the host
is the limit) and the functions with the most own CPU time, with their cumulative time.
Needs ``yappi`` (in the GPU wheelhouse).

``--timed`` instead wraps the named functions (``module:qualname``; none: :func:`default_timed`) with a clock and prints the
p10/p50/p90 of their per-call wall time in the profiled run: ~1 us per call instead of yappi's
several-fold slowdown, so the pipeline keeps its real timing.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import pkgutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from inference_fastpath.workflows.running import configure_environment

configure_environment()


def default_timed() -> List[Tuple[Any, str]]:
    """The calls ``--timed`` measures by default, as (owner, attribute) pairs. A module-level
    function is wrapped in the module that calls it (where its name is looked up per call)."""
    import inference.core  # noqa: F401 - installs the server's workflows configuration first
    from roboflow_workflows.execution_engine.v1.core import ExecutionEngineV1

    from inference_fastpath.adapters import runner
    from inference_fastpath.adapters.engine.base import EngineBase
    from inference_fastpath.adapters.postprocess import program
    from inference_fastpath.adapters.postprocess.fused import FusedPostprocess
    from inference_fastpath.adapters.preprocess import upload
    from inference_fastpath.adapters.preprocess.triton import TritonPreprocess
    from inference_fastpath.adapters.visualization import mask_painting, painter_choice
    from inference_fastpath.adapters.visualization.crop_painting import CropMaskPainter
    from inference_fastpath.adapters.visualization.mask_painting import GpuMaskPainter
    from inference_fastpath.blocks.mask_visualization_v1 import FastpathMaskVisualizationBlockV1
    from roboflow_workflows.core_steps.visualizations.bounding_box.v1 import BoundingBoxVisualizationBlockV1
    from roboflow_workflows.core_steps.visualizations.label.v1 import LabelVisualizationBlockV1

    return [
        (ExecutionEngineV1, "run"),
        (runner.SegmentationRunner, "launch"),
        (runner.SegmentationRunner, "complete"),
        (TritonPreprocess, "run_supported"),
        (TritonPreprocess, "unsupported_reason"),
        (upload.Staging, "upload"),
        (upload, "fill_chunk"),
        (EngineBase, "input_buffer"),
        (EngineBase, "__call__"),
        (FusedPostprocess, "run_supported"),
        (FusedPostprocess, "_execute"),
        (program.PostprocessProgram, "finish"),
        (program.PostprocessProgram, "_host_payload"),
        (program, "paste_crops"),
        (runner, "to_sv_detections"),
        # the annotated workflow's steps after ours (--workflow annotated)
        (FastpathMaskVisualizationBlockV1, "run"),
        (painter_choice.CoverageRoutedPainter, "run_checked"),
        (painter_choice, "covered_fraction"),
        (CropMaskPainter, "run_checked"),
        (GpuMaskPainter, "run_checked"),
        (mask_painting, "run_edges"),
        (GpuMaskPainter, "_received_copy"),
        (BoundingBoxVisualizationBlockV1, "run"),
        (LabelVisualizationBlockV1, "run"),
    ]


def resolve_targets(names: Sequence[str]) -> List[Tuple[Any, str]]:
    """``module:qualname`` names from the command line -> (owner, attribute) pairs."""
    targets = []
    for name in names:
        module_name, colon, qualname = name.partition(":")
        if not colon or not qualname:
            raise SystemExit(f"--timed {name!r}: expected module:qualname")
        owner_name, _, attribute = qualname.rpartition(".")
        owner = pkgutil.resolve_name(f"{module_name}:{owner_name}" if owner_name else module_name)
        if not hasattr(owner, attribute):
            raise SystemExit(f"--timed {name!r}: {owner!r} has no attribute {attribute!r}")
        targets.append((owner, attribute))
    return targets


def wrap_with_clock(targets: Sequence[Tuple[Any, str]]) -> Dict[str, List[float]]:
    """Replace each (owner, attribute) by a wrapper appending its wall ms per call."""
    samples: Dict[str, List[float]] = defaultdict(list)
    for owner, name in targets:
        # a static or class method is wrapped inside its descriptor: set back as a bare function
        # it would be handed the instance as an extra first argument
        raw = inspect.getattr_static(owner, name)
        descriptor = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
        original = raw.__func__ if descriptor else getattr(owner, name)
        label = f"{getattr(owner, '__name__', owner)}.{name}"

        def timed(*args, __original=original, __key=label, **kwargs):
            start = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                samples[__key].append((time.perf_counter() - start) * 1e3)

        wrapped = functools.wraps(original)(timed)
        setattr(owner, name, descriptor(wrapped) if descriptor else wrapped)
    return samples


def print_call_times(samples: Dict[str, List[float]], frames: int) -> None:
    import numpy as np

    print(f"\n{'function':<60} {'calls/f':>7} {'p10 ms':>8} {'p50 ms':>8} {'p90 ms':>8}")
    for key, values in samples.items():
        values = values[len(values) // 5:]  # skip the warm-up share
        if values:
            p10, p50, p90 = np.percentile(values, [10, 50, 90])
            print(f"{key[-60:]:<60} {len(values) / max(1, frames * 0.8):7.2f} {p10:8.3f} {p50:8.3f} {p90:8.3f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fast-rle-depth2")
    parser.add_argument("--options", default="", help="extra block options, key=value,...")
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--workflow", default="plain", choices=("plain", "annotated"),
                        help="our block -> sink, or -> our mask visualization -> stock box and label visualizations")
    parser.add_argument("--model", help="package dir or model id (default: the random demo model)")
    parser.add_argument("--video", help="video file (default: the random demo's clip)")
    parser.add_argument("--resolution", default=None, help="resize the clip to WxH first, e.g. 1920x1080")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"))
    parser.add_argument("--timed", nargs="*", default=None,
                        help="time these module:qualname calls instead of running yappi (no names: a default set)")
    args = parser.parse_args(argv)

    from inference_fastpath.examples.benchmarks.benchmark import PRESETS, parse_config, run_configuration, truncated_clip
    from inference_fastpath.examples.demo_model import build_demo_model, default_clip_path
    from inference_fastpath.workflows import FASTPATH, FASTPATH_ANNOTATED, load_workflow

    options = dict(PRESETS[args.preset])
    options.update(parse_config(f"x:{args.options}")[1])
    model = args.model or str(build_demo_model())
    with tempfile.TemporaryDirectory() as directory:
        video = truncated_clip(args.video or str(default_clip_path()), args.frames, Path(directory), args.resolution)
        workflow = load_workflow(FASTPATH_ANNOTATED if args.workflow == "annotated" else FASTPATH, **options)
        plain = run_configuration("plain", workflow, video, model, 10, options=options)
        if args.timed is not None:
            samples = wrap_with_clock(resolve_targets(args.timed) if args.timed else default_timed())
            timed = run_configuration("timed", workflow, video, model, 10, options=options, fresh_runner=False)
            print(f"\nfps plain {plain['fps']:.1f}, timed {timed['fps']:.1f}")
            print_call_times(samples, timed["frames"])
            return 0
        import yappi

        yappi.set_clock_type(args.clock)
        yappi.clear_stats()
        yappi.start(builtins=True, profile_threads=True)
        profiled = run_configuration("profiled", workflow, video, model, 10, options=options, fresh_runner=False)
        yappi.stop()
    frames = max(1, profiled["frames"])
    wall_ms = 1e3 * profiled["wall_s"] / frames
    print(f"\nfps plain {plain['fps']:.1f}, profiled {profiled['fps']:.1f}; profiled wall {wall_ms:.2f} ms/frame")
    total = 0.0
    for thread in sorted(yappi.get_thread_stats(), key=lambda t: -t.ttot):
        per_frame = 1e3 * thread.ttot / frames
        total += per_frame
        if per_frame >= 0.01:
            print(f"thread {thread.name:<24} id={thread.id:<3} {per_frame:7.3f} ms/frame ({args.clock})")
    print(f"all threads {total:.3f} ms/frame vs wall {wall_ms:.3f}")
    stats = yappi.get_func_stats()
    stats.sort("tsub")
    print(f"\n{'function':<100} {'calls':>7} {'own ms/f':>9} {'cum ms/f':>9}")
    for row in list(stats)[: args.top]:
        name = f"{row.module.split('site-packages/')[-1]}:{row.lineno} {row.name}"
        print(f"{name[-100:]:<100} {row.ncall:>7} {1e3 * row.tsub / frames:9.3f} {1e3 * row.ttot / frames:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end benchmark through ``InferencePipeline``: the stock v3 block vs our block's configurations.

    python -m inference_fastpath.examples.benchmarks.benchmark --frames 60 --out bench.json
    python -m inference_fastpath.examples.benchmarks.benchmark --config "triton:preprocess=triton,postprocess=reference"

Every run includes the stock `roboflow_instance_segmentation_model@v3` block on the same model and clip.
No frame is dropped (WAIT/LAZY buffering); FPS is clocked from the first result after the warm-up frames
to the last result. For our block it also reports per-stage host times (median ms): time between runs
(decode wait + workflow overhead), preprocess, engine, postprocess, block output. Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from inference_fastpath.workflows.running import configure_environment

configure_environment()

import torch  # noqa: E402

from inference_fastpath.workflows.comparison import compare_detections  # noqa: E402
from inference_fastpath.workflows.video_files import read_frames, video_fps, write_clip  # noqa: E402

PRESETS: Dict[str, Dict[str, object]] = {
    "reference": dict(preprocess="reference", engine="auto", cuda_graphs=False, postprocess="reference"),
    "fast": dict(preprocess="auto", engine="auto", cuda_graphs=True, postprocess="auto", pipeline_depth=1),
    "fast-depth2": dict(preprocess="auto", engine="auto", cuda_graphs=True, postprocess="auto", pipeline_depth=2),
    "fast-rle": dict(preprocess="auto", engine="auto", cuda_graphs=True, postprocess="auto", mask_output="rle"),
    "fast-rle-depth2": dict(
        preprocess="auto", engine="auto", cuda_graphs=True, postprocess="auto", mask_output="rle", pipeline_depth=2
    ),
}
STAGES = ("between_runs_ms", "preprocess_ms", "engine_ms", "postprocess_ms", "output_ms")


def parse_config(text: str) -> tuple:
    """'name:key=value,key=value' -> (name, options)."""
    name, _, body = text.partition(":")
    options: Dict[str, object] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        options[key.strip()] = json.loads(value) if value in ("true", "false") or value.isdigit() else value
    return name, options


def truncated_clip(video: str, frames: int, directory: Path, resolution: Optional[str] = None) -> str:
    """The first ``frames`` frames, resized to ``resolution`` ("WxH") when given (an upscaled clip).
    A shorter video is played again from its start until it gives ``frames`` frames."""
    images = read_frames(video, count=frames)
    if images and len(images) < frames:
        images = [images[i % len(images)] for i in range(frames)]
    if resolution:
        import cv2

        width, height = (int(v) for v in resolution.lower().split("x"))
        images = [cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR) for image in images]
    path = directory / f"first{frames}-{resolution or 'native'}.mp4"
    return str(write_clip(path, images, fps=video_fps(video)))


def stage_medians(runner) -> Dict[str, float]:
    if runner is None or not runner.timings:
        return {}
    records = list(runner.timings)
    values = {
        "preprocess_ms": [t.preprocess_ms for t in records],
        "engine_ms": [t.engine_ms for t in records],
        "postprocess_ms": [t.postprocess_ms for t in records],
        "output_ms": [t.output_ms for t in records],
        "between_runs_ms": [t.extra["between_runs_ms"] for t in records if "between_runs_ms" in t.extra],
    }
    return {k: round(statistics.median(v), 3) for k, v in values.items() if v}


def decode_fps(video: str) -> float:
    """How fast OpenCV decodes the clip alone: the rate the video source can feed at most."""
    import cv2

    capture = cv2.VideoCapture(video)
    started, frames = time.perf_counter(), 0
    while capture.read()[0]:
        frames += 1
    capture.release()
    return frames / (time.perf_counter() - started)


def gpu_bound_fps(timeline: List[Dict[str, float]]) -> Optional[float]:
    """Frames/s if only the GPU work (preprocess + engine) limited the rate, from the timeline."""
    spans = []
    previous_done = None
    for row in timeline:
        ready, done = row.get("preprocess_done_gpu"), row.get("engine_done_gpu")
        if ready is None or done is None:
            continue
        start = ready if previous_done is None else max(ready, previous_done)
        spans.append(done - start)
        previous_done = done
    spans = spans[len(spans) // 5:]  # skip the warm-up (graph capture, kernel compilation)
    return 1000.0 / statistics.median(spans) if spans else None


def parity_summary(reports) -> Dict[str, object]:
    """Worst case over frames of the per-frame comparisons (see workflows/comparison.py)."""
    if not reports:
        return {}
    return {
        "frames_compared": len(reports),
        "frames_within_bars": sum(r.within(confidence=1e-4, box_px=1.0, mask_iou=0.999) for r in reports),
        "count_mismatches": sum(r.count_a != r.count_b for r in reports),
        "class_mismatches": sum(not r.classes_equal for r in reports),
        "max_confidence_diff": max(r.max_confidence_diff for r in reports),
        "max_box_diff_px": max(r.max_box_diff_px for r in reports),
        "min_mask_iou": min(r.min_mask_iou for r in reports),
    }


def result_stalls(timeline: List[Dict[str, float]], warmup: int, factor: float = 5.0) -> Dict[str, object]:
    """Gaps between consecutive results after the warm-up that exceed ``factor`` times the median gap
    (and 30 ms): a compile, a capture or a page-in in the middle of the run. ``fps_between_stalls`` is
    the rate of the other gaps - what the run gave between them, not a run without them.

    Example:
        >>> rows = [{"result_ready": t} for t in (0, 10, 20, 30, 330, 340, 350)]
        >>> result_stalls(rows, warmup=1)
        {'stalls': 1, 'stall_ms': 300.0, 'longest_stall_ms': 300.0, 'fps_between_stalls': 100.0}
    """
    ready = [row["result_ready"] for row in timeline[warmup:] if row.get("result_ready") is not None]
    gaps = [later - earlier for earlier, later in zip(ready, ready[1:])]
    if not gaps:
        return {"stalls": 0, "stall_ms": 0.0, "longest_stall_ms": 0.0, "fps_between_stalls": None}
    bar = max(30.0, factor * statistics.median(gaps))
    stalls = [gap for gap in gaps if gap > bar]
    rest = [gap for gap in gaps if gap <= bar]
    return {"stalls": len(stalls), "stall_ms": round(float(sum(stalls)), 1),
            "longest_stall_ms": round(float(max(stalls, default=0.0)), 1),
            "fps_between_stalls": round(len(rest) / sum(rest) * 1e3, 2) if rest and sum(rest) > 0 else None}


def run_configuration(
    name: str,
    workflow: dict,
    video: str,
    model: str,
    warmup: int,
    options: Optional[dict] = None,
    keep: Optional[dict] = None,
    compare_with: Optional[dict] = None,
    polygonise: bool = False,
    fresh_runner: bool = True,
    source: str = "path",
) -> Dict[str, object]:
    """Runs one configuration. `keep` collects detections by frame id; `compare_with` checks against them.
    `fresh_runner=False` reuses the runner of an earlier run of the same options (graphs captured).
    `source`: "path" (InferencePipeline's own OpenCV decoder) or "pinned" (``pinned_video_source``:
    frames decoded into recycled pinned buffers)."""
    from inference_fastpath.adapters.options import FastpathOptions
    from inference_fastpath.adapters.runner import RUNNERS
    from inference_fastpath.adapters.timeline import Timeline
    from inference_fastpath.workflows.running import run_pipeline

    if fresh_runner:
        RUNNERS.clear()  # each configuration starts from a fresh runner (the loaded model stays cached)
    runner = None
    if options is not None:  # ours: build the step's runner up front and record its timeline
        runner = RUNNERS.get(model_id=model, options=FastpathOptions.from_values(options))
        runner.timeline = Timeline(runner.loaded.device)
    delivered: Dict[int, object] = {}

    def on_result(prediction, frame) -> None:
        # only keep the result: comparing inside the sink would slow the run being timed
        delivered[frame.frame_id] = prediction.get("predictions")

    if source not in ("path", "pinned"):
        raise ValueError(f"source must be 'path' or 'pinned', got {source!r}")
    reference = video
    if source == "pinned":
        from inference_fastpath.adapters.cuda.pinned_video_source import pinned_video_source

        reference = pinned_video_source(video)
    # results are not kept: an annotated workflow's frames would hold their memory, and every new frame
    # would then fault in fresh pages (examples/benchmarks/pipeline_setup_cost.py, "keep")
    run = run_pipeline(reference, workflow, {"model_id": model}, warmup_frames=warmup, on_result=on_result,
                       keep_results=False)
    if keep is not None:
        keep.update(delivered)
    reports = [
        compare_detections(detections, compare_with[frame_id], polygonise_a=polygonise)
        for frame_id, detections in delivered.items()
        if compare_with is not None and frame_id in compare_with
    ]
    detections = [len(predictions) for predictions in delivered.values() if predictions is not None]
    result = {
        "name": name,
        "frames": len(run.results),
        "frame_ids_in_order": run.frame_ids == sorted(run.frame_ids),
        "fps": run.fps_after_warmup(),
        "wall_s": round(run.finished_at - run.started_at, 3),
        "mean_detections": statistics.mean(detections) if detections else 0.0,
        "errors": run.errors,
        "stages_ms": stage_medians(runner),
        "stage_choices": [vars(c) for c in runner.choices] if runner else [],
        "parity": parity_summary(reports),
        "source": source,
    }
    if source == "pinned" and reference.producer is not None:
        fast_preprocess = getattr(runner.preprocess, "fast", None) if runner is not None else None
        result["pinned_source"] = dict(
            pooled_frames=reference.producer.pooled_frames,
            other_frames=reference.producer.other_frames,
            buffers=reference.producer.pool.allocations,
            pinned=reference.producer.pool.pin,
            fallback_reason=reference.producer.pool.fallback_reason,
            # frames the Triton preprocess sent straight from pinned memory (None: reference stage)
            sent_without_staging=getattr(fast_preprocess, "pinned_frames_sent", None),
        )
    if runner is not None and runner.timeline is not None:
        result["timeline"] = runner.timeline.resolve()
        result["gpu_bound_fps"] = gpu_bound_fps(result["timeline"])
        result["stalls"] = result_stalls(result["timeline"], warmup)
    fps = f"{result['fps']:.2f}" if result["fps"] else "n/a"
    stalled = result.get("stalls", {})
    stalls = (f" ({stalled['stalls']} stalls, {stalled['stall_ms']} ms; {stalled['fps_between_stalls']} fps between them)"
              if stalled.get("stalls") else "")
    print(f"{name:>14}: {result['frames']} frames, {fps} fps{stalls}, {result['mean_detections']:.1f} det/frame "
          f"{result['stages_ms']} parity={result['parity']}", flush=True)
    return result


def plot(results: List[Dict[str, object]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written")
        return
    names = [r["name"] for r in results]
    fps = [r["fps"] or 0 for r in results]
    figure, axis = plt.subplots(figsize=(max(5, 1.4 * len(names)), 3.5))
    bars = axis.bar(names, fps, color=["#888888"] + ["#2a7ab9"] * (len(names) - 1))
    axis.bar_label(bars, fmt="%.1f")
    axis.set_ylabel("frames per second (end to end)")
    axis.set_title("RF-DETR-seg through InferencePipeline")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"chart: {path}")


def plot_timeline(result: Dict[str, object], path: str, frames: int = 12) -> None:
    """Per frame: host launch (preprocess+engine submit), GPU work, host postprocess, result ready."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result["timeline"][-frames:]
    origin = rows[0]["launch_start"]
    figure, axis = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.2))
    for y, row in enumerate(rows):
        def span(a, b, color, label):
            if a in row and b in row and row[b] >= row[a]:
                axis.broken_barh([(row[a] - origin, row[b] - row[a])], (y - 0.4, 0.8), color=color,
                                 label=label if y == 0 else None)
        span("launch_start", "engine_submitted", "#9ecae1", "host: preprocess + engine submit")
        span("launch_start", "engine_done_gpu", "#3182bd", None)
        span("engine_submitted", "postprocess_done", "#fdae6b", "host: waiting + postprocess")
        if "preprocess_done_gpu" in row and "engine_done_gpu" in row:
            axis.broken_barh([(row["preprocess_done_gpu"] - origin, row["engine_done_gpu"] - row["preprocess_done_gpu"])],
                             (y - 0.15, 0.3), color="#08519c", label="GPU: engine" if y == 0 else None)
        if "result_ready" in row:
            axis.plot(row["result_ready"] - origin, y, "k|", markersize=12, label="result ready" if y == 0 else None)
    axis.set_yticks(range(len(rows)))
    axis.set_yticklabels([f"frame {int(r['index']) + 1}" for r in rows])
    axis.invert_yaxis()
    axis.set_xlabel("ms")
    axis.set_title(f"{result['name']}: last {len(rows)} frames")
    axis.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"timeline: {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", help="video file (default: bundled clip)")
    parser.add_argument("--model", help="model id or package dir (default: demo model)")
    parser.add_argument("--frames", type=int, default=60, help="frames to run per configuration (<= 300)")
    parser.add_argument("--warmup", type=int, default=5, help="results ignored before the clock starts")
    parser.add_argument("--presets", default="reference,fast", help=f"comma list of {sorted(PRESETS)}")
    parser.add_argument("--config", action="append", default=[],
                        help="extra 'name:key=value,...' configuration (block options, plus switch_interval_ms: "
                             "the Python GIL switch interval during that run, and source=path|pinned: the "
                             "video source, see adapters/cuda/pinned_video_source.py)")
    parser.add_argument("--resolution", default=None, help="resize the clip to WxH first, e.g. 1920x1080")
    parser.add_argument("--stock", default="plain",
                        help="comma list of stock workflows to run first: plain (v3 -> sink) and/or annotated "
                             "(v3 -> stock mask, box and label visualizations)")
    parser.add_argument("--out", default="benchmark.json")
    parser.add_argument("--png", default=None, help="chart path (default: --out with .png)")
    args = parser.parse_args(argv)

    from inference_fastpath.examples.demo_model import build_demo_model, default_clip_path
    from inference_fastpath.workflows import FASTPATH, FASTPATH_ANNOTATED, STOCK_V3, STOCK_V3_ANNOTATED, load_workflow

    source = args.video or str(default_clip_path())
    model = args.model or str(build_demo_model())
    configurations = [(name, PRESETS[name]) for name in filter(None, args.presets.split(","))]
    configurations += [parse_config(text) for text in args.config]
    with tempfile.TemporaryDirectory() as directory:
        video = truncated_clip(source, args.frames, Path(directory), args.resolution)
        decode_rate = decode_fps(video)
        print(f"decode alone: {decode_rate:.1f} fps", flush=True)
        # Detections are compared frame by frame: our first configuration against the stock block
        # (through the stock polygon step, see workflows/comparison.py), every later one against our first.
        stock, ours_first = {}, {}
        stock_workflows = {"plain": ("stock-v3", STOCK_V3), "annotated": ("stock-v3-annotated", STOCK_V3_ANNOTATED)}
        results = []
        for kind in filter(None, args.stock.split(",")):
            name, workflow_name = stock_workflows[kind]
            results.append(run_configuration(name, load_workflow(workflow_name), video, model, args.warmup,
                                             keep=stock if not stock else None))
        default_interval = sys.getswitchinterval()
        for index, (name, options) in enumerate(configurations):
            options = dict(options)
            # not a block option: the interpreter's GIL switch interval for this configuration's run
            interval_ms = options.pop("switch_interval_ms", None)
            source_kind = str(options.pop("source", "path"))
            # not a block option either: plain (our block -> sink) or annotated (-> our GPU mask
            # visualization -> stock box and label visualizations)
            workflow_kind = str(options.pop("workflow", "plain"))
            sys.setswitchinterval(float(interval_ms) / 1e3 if interval_ms is not None else default_interval)
            workflow = load_workflow(FASTPATH_ANNOTATED if workflow_kind == "annotated" else FASTPATH, **options)
            results.append(run_configuration(
                name, workflow, video, model, args.warmup, options=options,
                keep=ours_first if index == 0 else None,
                compare_with=stock if index == 0 else ours_first,
                polygonise=index == 0,
                source=source_kind,
            ))
    for result in results:
        bound = min(filter(None, [decode_rate, result.get("gpu_bound_fps")]))
        result["slowest_stage_bound_fps"] = bound
        result["fraction_of_bound"] = (result["fps"] / bound) if result["fps"] and "gpu_bound_fps" in result else None
    report = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "video": source,
        "frames": args.frames,
        "resolution": args.resolution or "native",
        "warmup": args.warmup,
        "model": model,
        "decode_fps": decode_rate,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"results: {args.out}")
    plot(results, args.png or str(Path(args.out).with_suffix(".png")))
    for result in results:
        if result.get("timeline"):
            plot_timeline(result, str(Path(args.out).with_name(f"{Path(args.out).stem}-timeline-{result['name']}.png")))
    return 0 if all(not r["errors"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end benchmark through ``InferencePipeline``: the stock v3 block vs our block's configurations.

    python -m inference_fastpath.examples.benchmark --frames 60 --out bench.json
    python -m inference_fastpath.examples.benchmark --config "triton:preprocess=triton,postprocess=reference"

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

from inference_fastpath.examples.runtime import configure_environment

configure_environment()

import cv2  # noqa: E402
import torch  # noqa: E402

PRESETS: Dict[str, Dict[str, object]] = {
    "reference": dict(preprocess="reference", engine="auto", cuda_graphs=False, postprocess="reference"),
    "fast": dict(preprocess="auto", engine="auto", cuda_graphs=True, postprocess="auto", pipeline_depth=1),
    "fast-depth2": dict(preprocess="auto", engine="auto", cuda_graphs=True, postprocess="auto", pipeline_depth=2),
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


def truncated_clip(video: str, frames: int, directory: Path) -> str:
    capture = cv2.VideoCapture(video)
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    path = directory / f"first{frames}.mp4"
    writer = None
    for _ in range(frames):
        ok, frame = capture.read()
        if not ok:
            break
        if writer is None:
            height, width = frame.shape[:2]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        writer.write(frame)
    capture.release()
    if writer is not None:
        writer.release()
    return str(path)


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


def run_configuration(name: str, workflow: dict, video: str, model: str, warmup: int) -> Dict[str, object]:
    from inference_fastpath.adapters.segmentation_runner import RUNNERS
    from inference_fastpath.examples.runtime import run_pipeline

    RUNNERS.clear()  # each configuration starts from a fresh runner (the loaded model stays cached)
    run = run_pipeline(video, workflow, {"model_id": model}, warmup_frames=warmup)
    detections = [len(r["predictions"]) for r in run.results if r.get("predictions") is not None]
    runner = next(iter(RUNNERS._runners.values()), None)  # noqa: SLF001 - benchmark introspection
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
    }
    fps = f"{result['fps']:.2f}" if result["fps"] else "n/a"
    print(f"{name:>14}: {result['frames']} frames, {fps} fps, {result['mean_detections']:.1f} det/frame "
          f"{result['stages_ms']}", flush=True)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", help="video file (default: bundled clip)")
    parser.add_argument("--model", help="model id or package dir (default: demo model)")
    parser.add_argument("--frames", type=int, default=60, help="frames to run per configuration (<= 300)")
    parser.add_argument("--warmup", type=int, default=5, help="results ignored before the clock starts")
    parser.add_argument("--presets", default="reference,fast", help=f"comma list of {sorted(PRESETS)}")
    parser.add_argument("--config", action="append", default=[], help="extra 'name:key=value,...' configuration")
    parser.add_argument("--out", default="benchmark.json")
    parser.add_argument("--png", default=None, help="chart path (default: --out with .png)")
    args = parser.parse_args(argv)

    from inference_fastpath.examples.demo_model import build_demo_model, default_clip_path
    from inference_fastpath.workflows import FASTPATH, STOCK_V3, load_workflow

    source = args.video or str(default_clip_path())
    model = args.model or str(build_demo_model())
    configurations = [(name, PRESETS[name]) for name in filter(None, args.presets.split(","))]
    configurations += [parse_config(text) for text in args.config]
    with tempfile.TemporaryDirectory() as directory:
        video = truncated_clip(source, args.frames, Path(directory))
        results = [run_configuration("stock-v3", load_workflow(STOCK_V3), video, model, args.warmup)]
        for name, options in configurations:
            results.append(run_configuration(name, load_workflow(FASTPATH, **options), video, model, args.warmup))
    report = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "video": source,
        "frames": args.frames,
        "warmup": args.warmup,
        "model": model,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"results: {args.out}")
    plot(results, args.png or str(Path(args.out).with_suffix(".png")))
    return 0 if all(not r["errors"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What the masks of a model look like to the mask-dependent stages: area and COCO RLE runs.

Every cost the benchmarks measure after the engine (dense paste, RLE encoding, compact crops,
visualization, polygons) grows with the masks' area or their number of runs, so a benchmark
figure only means something next to these. Runs inference-models' own pre_process -> forward
-> post_process on frames of a clip (CPU or GPU) and reports, per model: detections per frame,
mask area as a fraction of the frame, and COCO RLE runs per mask (column-major, as pycocotools
counts them), mean and median.

    python -m inference_fastpath.examples.benchmarks.mask_statistics --frames 24 --out masks.json
        # the random demo on the pedestrian clip vs the trained demo on the shapes clip

It also times, per frame, the stock v3 polygon-step rule the block applies to compact masks
(``adapters/masks.py``): as the block runs it (the first runs tried alone first) and reading every run.
``--resolution 1920x1080`` resizes the frames first, as the 1080p benchmarks do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from inference_fastpath.workflows.running import configure_environment

configure_environment()

import torch  # noqa: E402

CONFIDENCE = 0.4


def rle_runs(mask: np.ndarray) -> int:
    """Number of counts in the mask's uncompressed COCO RLE: runs of equal pixels in column-major
    order, the first one background (of length 0 when the first pixel is foreground)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    if flat.size == 0:
        return 0
    changes = int(np.count_nonzero(flat[1:] != flat[:-1]))
    return changes + 1 + int(flat[0])


def mask_statistics(masks_per_frame: Sequence[np.ndarray]) -> Dict[str, Any]:
    """Summary over frames of (N, H, W) boolean masks."""
    areas: List[float] = []
    runs: List[int] = []
    for masks in masks_per_frame:
        for mask in masks:
            areas.append(float(mask.mean()))
            runs.append(rle_runs(mask))
    frames = len(masks_per_frame)
    return {
        "frames": frames,
        "detections_per_frame": len(areas) / max(1, frames),
        "mask_area_fraction_mean": float(np.mean(areas)) if areas else None,
        "mask_area_fraction_median": float(np.median(areas)) if areas else None,
        "rle_runs_per_mask_mean": float(np.mean(runs)) if runs else None,
        "rle_runs_per_mask_median": float(np.median(runs)) if runs else None,
    }


def polygon_rule_ms(masks_per_frame: Sequence[np.ndarray], repeats: int = 5) -> Dict[str, float]:
    """Host ms per frame of the polygon-step rule's run test on compact masks: as the block runs it, all
    of a frame's masks in one pass with their first runs tried first (``first_runs``); the same one mask at
    a time (``per_mask``, the block until this was batched); and reading every run (``all_runs``)."""
    import time

    from inference_fastpath.adapters.masks import _l_shapes, _l_shapes_in_edges
    from inference_fastpath.adapters.postprocess.compact import compact_from_dense

    frames = []
    for masks in masks_per_frame:
        compact = compact_from_dense(masks) if len(masks) else None
        if compact is not None:
            frames.append(([np.cumsum(np.asarray(c, dtype=np.int64)) for c in compact._rles],
                           compact._crop_shapes[:, 0].astype(np.int64)))

    def per_mask(edges, heights):
        return [bool(_l_shapes([e], [h])[0]) for e, h in zip(edges, heights)]

    rules = {"first_runs": _l_shapes, "per_mask": per_mask, "all_runs": _l_shapes_in_edges}
    timings = {}
    for name, rule in rules.items():
        started = time.perf_counter()
        for _ in range(repeats):
            verdicts = [np.asarray(rule(edges, heights)) for edges, heights in frames]
        timings[f"polygon_rule_ms_{name}"] = (time.perf_counter() - started) * 1e3 / repeats / max(1, len(masks_per_frame))
        timings[f"polygon_rule_kept_{name}"] = int(sum(int(v.sum()) for v in verdicts))
    return timings


def compact_output_ms(masks_per_frame: Sequence[np.ndarray], repeats: int = 3) -> Dict[str, float]:
    """Host ms per frame of the compact output after the device program: crop runs built from the
    transition positions, then the polygon-step rule on them (``eager``, the block until 8150b39), against
    lazy masks whose rule reads the transitions and builds nothing (``lazy``). Verdicts must agree."""
    import time

    from inference_fastpath.adapters.masks import survives_polygon_step
    from inference_fastpath.adapters.postprocess.compact import LazyCompactMasks, compact_from_transitions

    frames = []
    for masks in masks_per_frame:
        per_mask = [np.flatnonzero(np.diff(np.concatenate([[False], f]).astype(np.int8))) for f in
                    (masks[i].ravel(order="F") for i in range(len(masks)))]
        frames.append((per_mask, masks.shape[1:], np.zeros((len(masks), 4))))
    timings: Dict[str, float] = {}
    verdicts: Dict[str, List[List[bool]]] = {}
    builders = {"eager": compact_from_transitions, "lazy": LazyCompactMasks}
    for name, build in builders.items():
        started = time.perf_counter()
        for _ in range(repeats):
            verdicts[name] = [survives_polygon_step(build(per_mask, *shape), boxes).tolist()
                              for per_mask, shape, boxes in frames]
        timings[f"compact_output_ms_{name}"] = (time.perf_counter() - started) * 1e3 / repeats / max(1, len(frames))
    if verdicts["eager"] != verdicts["lazy"]:
        raise AssertionError("the polygon-step rule decided differently on lazy and built compact masks")
    return timings


def model_masks(package: Path, video: Path, frames: int, device: torch.device,
                resolution: Optional[Tuple[int, int]] = None) -> List[np.ndarray]:
    from inference_models import AutoModel

    from inference_fastpath.workflows.video_files import frame_count, read_frames

    model = AutoModel.from_pretrained(str(package), device=device)
    total = max(1, frames)
    picked = read_frames(str(video), count=total, step=max(1, frame_count(video) // total))
    out = []
    for image in picked:  # BGR, as InferencePipeline passes frames
        if resolution is not None:
            import cv2

            image = cv2.resize(image, resolution)
        x, meta = model.pre_process(image)
        with torch.no_grad():
            detections = model.post_process(model.forward(x), meta, confidence=CONFIDENCE)[0]
        out.append(detections.mask.cpu().numpy().astype(bool))
    return out


def default_cases() -> List[Tuple[str, Path, Path]]:
    from inference_fastpath.examples.demo_model import build_demo_model, default_clip_path
    from inference_fastpath.examples.trained_demo import build_trained_demo_model, default_video_path

    return [
        ("random demo, pedestrian clip", build_demo_model(), default_clip_path()),
        ("trained demo, shapes clip", build_trained_demo_model(), default_video_path()),
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=24, help="frames per clip, evenly spaced")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", default=None, help="resize the frames to WxH first, e.g. 1920x1080")
    parser.add_argument("--out", default="mask_statistics.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    resolution = None
    if args.resolution:
        try:
            width, height = (int(v) for v in args.resolution.lower().split("x"))
        except ValueError:
            parser.error(f"--resolution takes WxH, e.g. 1920x1080, got {args.resolution!r}")
        resolution = (width, height)
    report = []
    for name, package, video in default_cases():
        masks = model_masks(package, video, args.frames, device, resolution)
        stats = {**mask_statistics(masks), **polygon_rule_ms(masks), **compact_output_ms(masks)}
        report.append({"name": name, "package": str(package), "video": str(video), **stats})
        print(f"{name:<32} {stats['detections_per_frame']:6.2f} detections/frame, mask area "
              f"{stats['mask_area_fraction_mean']:.4f} of the frame (median {stats['mask_area_fraction_median']:.4f}), "
              f"RLE runs per mask {stats['rle_runs_per_mask_mean']:.1f} (median {stats['rle_runs_per_mask_median']:.0f}); "
              f"polygon rule {stats['polygon_rule_ms_first_runs']:.2f} ms per frame (one mask at a time: "
              f"{stats['polygon_rule_ms_per_mask']:.2f} ms) "
              f"(all runs read: {stats['polygon_rule_ms_all_runs']:.2f} ms; kept {stats['polygon_rule_kept_first_runs']} "
              f"and {stats['polygon_rule_kept_all_runs']}); compact output {stats['compact_output_ms_eager']:.2f} ms "
              f"per frame with crop runs built, {stats['compact_output_ms_lazy']:.2f} ms lazy", flush=True)
    Path(args.out).write_text(json.dumps({"device": str(device), "confidence": CONFIDENCE, "resolution": args.resolution,
                                          "cases": report}, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

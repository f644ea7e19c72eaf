"""Microbenchmark of the mask painters on compact masks: stock annotator, host crops, GPU kernel.

    python -m inference_fastpath.examples.benchmarks.bench_mask_painting --out bench_mask_painting.json

For each frame size and mask load (N elliptic objects, each spanning a given fraction of the frame's
side), times the painting of one frame, copy of the frame included, as the block does it:

* ``stock_compact``: supervision's ``MaskAnnotator`` on the CompactMask, what the stock block does
  with our output (it blends the rectangle all masks span together);
* ``stock_dense``: the same annotator on full-frame dense masks, the stock block on a dense prediction;
* ``crops``: ``CropMaskPainter``, each mask's own rectangle on the host;
* ``triton``: ``GpuMaskPainter`` (CUDA only), the covered region's round trip through the GPU;
* ``auto``: what ``painter=auto`` picks for that load.

Every painter's picture is compared with ``stock_dense`` first (largest channel difference reported).
``--phases`` splits the GPU painter's time into its phases instead (``painter_phases.py``).
``runs_host_ms`` is the host part of the GPU painter's input, timed on any machine: the masks' runs
split into the kernel's pieces (``MaskRuns.from_edges``).
The summed crop area (``coverage``, in frames) is the quantity ``auto`` routes on.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional

import numpy as np

from inference_fastpath.examples.benchmarks import painter_phases
from inference_fastpath.examples.benchmarks.painter_phases import median_ms

SIZES = {"768x576": (576, 768), "1080p": (1080, 1920), "4k": (2160, 3840)}
# (objects, fraction of the frame's side each spans): trained-demo-like, crowded, frame-filling
LOADS = ((6, 0.1), (20, 0.08), (6, 0.3), (13, 0.55))


def _scene(hw, objects: int, side: float, seed: int = 0):
    import supervision as sv
    from supervision.detection.compact_mask import CompactMask

    rng = np.random.default_rng(seed)
    height, width = hw
    masks = np.zeros((objects, height, width), bool)
    boxes = np.zeros((objects, 4))
    for i in range(objects):
        h, w = max(1, int(height * side)), max(1, int(width * side))
        y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        yy, xx = np.ogrid[:h, :w]
        masks[i, y:y + h, x:x + w] = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 < 1
        boxes[i] = (x, y, x + w - 1, y + h - 1)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    compact = sv.Detections(xyxy=boxes, class_id=np.arange(objects), mask=CompactMask.from_dense(masks, boxes, hw))
    dense = sv.Detections(xyxy=boxes, class_id=np.arange(objects), mask=masks)
    return frame, compact, dense


def run(sizes: Dict[str, tuple], loads, budget_s: float) -> List[Dict]:
    import supervision as sv
    import torch

    from inference_fastpath.adapters.postprocess.compact import run_edges
    from inference_fastpath.adapters.visualization.crop_painting import CropMaskPainter, covered_fraction
    from inference_fastpath.kernels.mask_overlay import MaskRuns
    from inference_fastpath.adapters.visualization.painter_choice import resolve_painter

    annotator = sv.MaskAnnotator(opacity=0.5)
    painters = {"crops": CropMaskPainter(), "auto": resolve_painter("auto")[0]}
    if torch.cuda.is_available():
        from inference_fastpath.adapters.visualization.mask_painting import GpuMaskPainter

        painters["triton"] = GpuMaskPainter(torch.device("cuda"))
    rows = []
    for size, hw in sizes.items():
        for objects, side in loads:
            frame, compact, dense = _scene(hw, objects, side)
            expected = annotator.annotate(frame.copy(), dense)
            paths = {"stock_dense": lambda: annotator.annotate(frame.copy(), dense),
                     "stock_compact": lambda: annotator.annotate(frame.copy(), compact)}
            for name, painter in painters.items():
                # copy_image=True, as the block's default: each painter makes its own copy
                paths[name] = lambda painter=painter: painter(frame, compact, annotator, copy=True)
            row = {"size": size, "objects": objects, "side": side,
                   "coverage": round(covered_fraction(compact.mask, hw), 3), "ms": {}, "max_difference": {}}
            priorities = np.arange(len(compact))
            row["runs_host_ms"] = round(median_ms(lambda: MaskRuns.from_edges(*run_edges(compact.mask), priorities),
                                              budget_s), 3)
            for name, fn in paths.items():
                picture = fn()
                row["max_difference"][name] = int(np.abs(picture.astype(np.int16) - expected).max())
                row["ms"][name] = round(median_ms(fn, budget_s), 3)
            print(f"{size:>8} {objects:>3} x {side:.2f} (coverage {row['coverage']:.2f}): "
                  + "  ".join(f"{k} {v:.2f} ms" for k, v in row["ms"].items()) + f"  runs (host) {row['runs_host_ms']:.2f} ms"
                  + f"  | max diff {max(row['max_difference'].values())}", flush=True)
            rows.append(row)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="768x576,1080p", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per path and case")
    parser.add_argument("--phases", action="store_true",
                        help="the GPU painter's phases on demo-like masks instead (painter_phases.py)")
    parser.add_argument("--total-only", action="store_true", help="with --phases: the whole painter only")
    parser.add_argument("--out", default="bench_mask_painting.json")
    args = parser.parse_args(argv)
    if args.phases:
        rows = painter_phases.run({name: painter_phases.SIZES[name] for name in args.sizes.split(",")},
                                  args.budget, args.total_only)
    else:
        rows = run({name: SIZES[name] for name in args.sizes.split(",")}, LOADS, args.budget)
    with open(args.out, "w") as handle:
        json.dump({"rows": rows}, handle, indent=1)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

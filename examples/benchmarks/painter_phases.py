"""Where the GPU mask painter's time goes, phase by phase, on the block's own (lazy) compact masks.

    python -m inference_fastpath.examples.benchmarks.bench_mask_painting --phases --out painter_phases.json

The masks imitate the random demo's at each size (``bench_mask_painting`` uses smooth ellipses): 13
masks spanning 70% of the frame's side, striped so that a column crosses each about six times, which
gives thousands of runs per mask. Each phase runs alone between two device synchronisations and is
reported as its median over ``--budget`` seconds:

* ``host_input``: what ``painter=auto`` and the painter work out on the host for a frame's new masks
  (the routing's coverage, region, draw order, colours, the runs' table);
* ``upload_band`` / ``upload_band_pinned``: the painted rows to the GPU from the frame / from pinned memory;
* ``upload_runs``: the runs' table to the GPU;
* ``paint_labels``: the label plane cleared and the runs painted into it (``kernels/mask_overlay.py``);
* ``blend``: the frame blended where a label is set;
* ``download_band``: the painted rows back, into pinned memory;
* ``painter_copy`` / ``painter_in_place``: the whole painter, as the block calls it (``copy_image``
  true and false).

``--total-only`` times the last two alone, through the painter's public call only, so an older tree's
painter can be timed by this module's :func:`run` for a before/after in one run.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import numpy as np

SIZES = {"768x576": (576, 768), "1080p": (1080, 1920), "tiny": (36, 48)}  # tiny: a CPU smoke run


def demo_like_masks(hw, objects: int = 13, side: float = 0.7, seed: int = 0) -> np.ndarray:
    """(N, H, W) bool: ellipses crossed by tilted stripes, so each column holds several runs."""
    rng = np.random.default_rng(seed)
    height, width = hw
    masks = np.zeros((objects, height, width), bool)
    yy, xx = np.mgrid[:height, :width]
    for i in range(objects):
        h, w = max(1, int(height * side)), max(1, int(width * side))
        y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        inside = ((yy - y - h / 2) / (h / 2)) ** 2 + ((xx - x - w / 2) / (w / 2)) ** 2 < 1
        stripes = np.sin((yy + 0.3 * xx) * (6 * 2 * np.pi / max(h, 1)) + rng.uniform(0, 6.3)) > -0.6
        masks[i] = inside & stripes
    return masks


def lazy_detections(masks: np.ndarray):
    """Detections carrying the masks as the block outputs them: lazy compact masks of their transitions."""
    import supervision as sv

    from inference_fastpath.adapters.postprocess.compact import LazyCompactMasks

    boxes = np.zeros((len(masks), 4))
    transitions = []
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        boxes[i] = (xs.min(), ys.min(), xs.max(), ys.max()) if ys.size else (0, 0, 0, 0)
        flat = mask.ravel(order="F").astype(np.int8)
        # int32, as the fused postprocess's device program copies them back
        transitions.append(np.flatnonzero(flat != np.concatenate([[0], flat[:-1]])).astype(np.int32))
    return sv.Detections(xyxy=boxes, class_id=np.arange(len(masks)),
                         mask=LazyCompactMasks(transitions, *masks.shape[1:]))


def median_ms(fn: Callable[[], object], budget_s: float, sync: Callable[[], None] = lambda: None,
              min_iters: int = 5) -> float:
    """Median wall milliseconds of ``fn`` over ``budget_s`` seconds (at least ``min_iters`` calls), each
    call between two ``sync`` calls (a device synchronisation for GPU work)."""
    fn()
    sync()
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < min_iters or time.perf_counter() - start < budget_s:
        sync()
        begin = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - begin) * 1e3)
    return round(statistics.median(samples), 3)


def _phases(frame, detections, annotator, painter, budget_s: float, sync) -> Dict[str, float]:
    import supervision as sv
    import torch
    from supervision.annotators.utils import resolve_color

    from inference_fastpath.adapters.postprocess.compact import LazyCompactMasks, run_edges
    from inference_fastpath.adapters.visualization.crop_painting import covered_fraction
    from inference_fastpath.adapters.visualization.mask_painting import _covered_region
    from inference_fastpath.kernels.mask_overlay import MaskRuns, launch_blend, launch_paint_labels

    height, width = frame.shape[:2]
    device = painter.device

    def host_input():
        # new masks each time, as every frame brings: nothing the masks cache carries over
        fresh = LazyCompactMasks(detections.mask._transitions, height, width)
        masks = sv.Detections(xyxy=detections.xyxy, class_id=detections.class_id, mask=fresh)
        covered_fraction(fresh, (height, width))
        x0, y0, x1, y1 = _covered_region(fresh, (height, width))
        order = np.flip(np.argsort(masks.area))
        priority = np.empty(len(order), dtype=np.int64)
        priority[order] = np.arange(len(order))
        colours = np.array([resolve_color(color=annotator.color, detections=masks, detection_idx=int(i),
                                          color_lookup=annotator.color_lookup).as_bgr() for i in order], np.uint8)
        edges, heights, corners = run_edges(fresh)
        return (x0, y0, x1, y1), MaskRuns.from_edges(edges, heights, corners - np.array([0, y0]), priority), colours

    (x0, y0, x1, y1), runs, colours = host_input()
    band = frame[y0:y1]
    pin = device.type == "cuda"
    pinned = torch.from_numpy(band.copy()).pin_memory() if pin else torch.from_numpy(band.copy())
    received = torch.empty(pinned.shape, dtype=torch.uint8, pin_memory=pin)
    pixels = torch.empty(pinned.shape, dtype=torch.uint8, device=device)
    labels = torch.empty((width, y1 - y0), dtype=torch.int32, device=device)
    colours_device = torch.from_numpy(colours).to(device)
    ms = {"host_input": median_ms(host_input, budget_s, sync),
          "upload_band": median_ms(lambda: pixels.copy_(torch.from_numpy(band), non_blocking=True), budget_s, sync),
          "upload_band_pinned": median_ms(lambda: pixels.copy_(pinned, non_blocking=True), budget_s, sync),
          "upload_runs": median_ms(lambda: torch.from_numpy(runs.table).to(device, non_blocking=True), budget_s, sync),
          "paint_labels": median_ms(lambda: (labels.fill_(-1), launch_paint_labels(runs, labels)), budget_s, sync),
          "blend": median_ms(lambda: launch_blend(pixels, labels, colours_device, annotator.opacity, (x0, 0, x1, y1 - y0)),
                         budget_s, sync),
          "download_band": median_ms(lambda: received.copy_(pixels, non_blocking=True), budget_s, sync)}
    return {**ms, "runs": runs.runs, "covered_pixels": runs.covered, "band_rows": y1 - y0}


def run(sizes: Dict[str, tuple], budget_s: float, total_only: bool) -> List[Dict]:
    import supervision as sv
    import torch

    from inference_fastpath.adapters.visualization.mask_painting import GpuMaskPainter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: TRITON_INTERPRET=1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    annotator = sv.MaskAnnotator(opacity=0.5)
    painter = GpuMaskPainter(device)
    rows = []
    for size, hw in sizes.items():
        masks = demo_like_masks(hw)
        detections = lazy_detections(masks)
        frame = np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)
        expected = annotator.annotate(frame.copy(), sv.Detections(xyxy=detections.xyxy, class_id=detections.class_id,
                                                                  mask=masks))
        picture = painter(frame, detections, annotator, copy=True)
        row = {"size": size, "max_difference": int(np.abs(picture.astype(np.int16) - expected).max()), "ms": {}}
        if not total_only:
            row["ms"].update(_phases(frame, detections, annotator, painter, budget_s, sync))
        scratch = frame.copy()
        row["ms"]["painter_copy"] = median_ms(lambda: painter(frame, detections, annotator, copy=True), budget_s, sync)
        row["ms"]["painter_in_place"] = median_ms(lambda: painter(scratch, detections, annotator, copy=False), budget_s, sync)
        print(f"{size:>8}: " + "  ".join(f"{k} {v}" for k, v in row["ms"].items())
              + f"  | max diff {row['max_difference']}", flush=True)
        rows.append(row)
    return rows

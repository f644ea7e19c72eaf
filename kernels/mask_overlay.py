"""Mask overlay: paint instance masks, given as runs, into a BGR frame and blend with opacity.

What supervision's ``MaskAnnotator`` computes, on the GPU: every mask pixel takes the colour of the
mask painted last over it (the caller gives each mask a priority: higher wins), then
``out = colour * opacity + frame * (1 - opacity)`` rounded to uint8; pixels no mask covers keep their
value. Masks arrive as :class:`MaskRuns` - the foreground runs of each mask's region, column-major as
``supervision.CompactMask`` stores them - so no full-frame mask is ever built.

Two launches: :func:`launch_paint_labels` writes, per pixel, the highest priority of the masks covering
it (``atomic_max`` into an int32 label plane, -1 = none); :func:`launch_blend` blends the labelled
pixels of a region of the frame in place.

The label plane is column-major, ``(W, H)``: a run is a stretch of one column, so the pixels a program
paints sit side by side in the plane and its atomics coalesce. Each program paints a fixed share of
all the covered pixels, whatever the runs' lengths, and finds each pixel's run by a binary search over
the runs' cumulative lengths: a frame of noisy masks holds tens of thousands of short runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PAINT_BLOCK = 1 << 14 if _INTERPRET else 1024  # covered pixels per paint program
BLEND_TILE = 256 if _INTERPRET else 32  # pixels on each side of a blend program's tile


@dataclass(frozen=True)
class MaskRuns:
    """Foreground runs of N masks, laid end to end in one table for a single upload: int32, or int64
    where the runs cover 2**31 pixels or more in all.

    ``table`` holds, in order: the runs' cumulative lengths (``runs + 1``, from 0), their starts
    (``runs``, pixel positions column-major within their mask's region), the mask of each run
    (``runs``), and per mask ``[region_h, x1, y1, priority]`` - the region's top-left corner at
    ``(x1, y1)`` of the plane painted. ``covered`` is the total length of the runs.
    """

    table: np.ndarray
    runs: int
    covered: int

    @classmethod
    def from_edges(cls, edges, region_heights, offsets, priorities) -> "MaskRuns":
        """From run edges ``[start, stop, start, stop, ...]`` (column-major pixel positions, a trailing
        unpaired edge ignored) per mask, in a region ``region_h`` tall whose top-left corner is at
        ``(x1, y1)``: a crop, or the whole frame at (0, 0) with the frame's height.

        Example:
            >>> runs = MaskRuns.from_edges([np.array([5, 7, 9, 10])], [4], np.array([[0, 0]]), np.array([3]))
            >>> runs.table.tolist(), runs.runs, runs.covered
            ([0, 2, 3, 5, 9, 0, 0, 4, 0, 0, 3], 2, 3)
        """
        edges = [np.asarray(mask_edges) for mask_edges in edges]  # int32 or int64, kept as given
        count = len(edges)
        per_mask = np.array([mask_edges.size // 2 for mask_edges in edges], dtype=np.int64)
        runs = int(per_mask.sum())
        paired = np.concatenate([mask_edges[:2 * n] for mask_edges, n in zip(edges, per_mask)]) if runs else np.zeros(0, np.int64)
        lengths = paired[1::2] - paired[0::2]
        covered = int(lengths.sum(dtype=np.int64))
        # half the upload in int32, which holds every position of a frame up to 2**31 pixels (edges ascend)
        last = max((int(e[2 * n - 1]) for e, n in zip(edges, per_mask) if n), default=0)
        table = np.empty(3 * runs + 1 + 4 * count, dtype=np.int32 if covered < 2**31 and last < 2**31 else np.int64)
        table[0] = 0
        np.cumsum(lengths, dtype=table.dtype, out=table[1:runs + 1])
        table[runs + 1:2 * runs + 1] = paired[0::2]
        table[2 * runs + 1:3 * runs + 1] = np.repeat(np.arange(count), per_mask)
        masks = table[3 * runs + 1:].reshape(count, 4)
        masks[:, 0] = np.asarray(region_heights, dtype=np.int64)
        masks[:, 1:3] = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        masks[:, 3] = np.asarray(priorities, dtype=np.int64)
        return cls(table, runs, covered)


# Every frame brings other counts and another region: specialising on them (Triton compiles a variant
# for an integer equal to 1 or divisible by 16) would compile new variants in the middle of a stream.
@triton.jit(do_not_specialize=["runs", "covered", "plane_h", "plane_w", "search_steps"])
def _paint_labels_kernel(table_ptr, runs, covered, labels_ptr, plane_h, plane_w, search_steps,
                         BLOCK: tl.constexpr):
    pixel = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = pixel < covered
    # the run holding each pixel: cum[lo] <= pixel < cum[hi], narrowed until hi = lo + 1
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = lo + runs
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        below = tl.load(table_ptr + mid, mask=live, other=0) <= pixel
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    position = tl.load(table_ptr + runs + 1 + lo, mask=live, other=0) + pixel - tl.load(table_ptr + lo, mask=live, other=0)
    info = table_ptr + 3 * runs + 1 + 4 * tl.load(table_ptr + 2 * runs + 1 + lo, mask=live, other=0)
    region_h = tl.load(info, mask=live, other=1)
    ys = tl.load(info + 2, mask=live, other=0) + position % region_h
    xs = tl.load(info + 1, mask=live, other=0) + position // region_h
    priority = tl.load(info + 3, mask=live, other=0).to(tl.int32)
    inside = live & (ys >= 0) & (ys < plane_h) & (xs >= 0) & (xs < plane_w)
    tl.atomic_max(labels_ptr + xs * plane_h + ys, priority, mask=inside)


@triton.jit
def _rint(x):
    # without libdevice, which the interpreter lacks
    floor = tl.floor(x)
    diff = x - floor
    odd = (floor - 2.0 * tl.floor(floor * 0.5)) != 0.0
    return tl.where((diff > 0.5) | ((diff == 0.5) & odd), floor + 1.0, floor)


@triton.jit(do_not_specialize=["x0", "y0", "x1", "y1", "plane_h", "width"])
def _blend_kernel(frame_ptr, labels_ptr, colors_ptr, x0, y0, x1, y1, plane_h, width, opacity,
                  TILE: tl.constexpr):
    ys = y0 + tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)[:, None]
    xs = x0 + tl.program_id(1).to(tl.int64) * TILE + tl.arange(0, TILE)[None, :]
    live = (ys < y1) & (xs < x1)
    label = tl.load(labels_ptr + xs * plane_h + ys, mask=live, other=-1)
    painted = live & (label >= 0)
    colour = colors_ptr + tl.maximum(label, 0) * 3
    keep = 1.0 - opacity
    for channel in tl.static_range(3):
        pixel = frame_ptr + (ys * width + xs) * 3 + channel
        value = tl.load(pixel, mask=painted, other=0).to(tl.float32)
        paint = tl.load(colour + channel, mask=painted, other=0).to(tl.float32)
        rounded = _rint(paint * opacity + value * keep)  # round half to even, as cv2.addWeighted's saturate_cast does
        tl.store(pixel, tl.minimum(tl.maximum(rounded, 0.0), 255.0).to(tl.uint8), mask=painted)


def launch_paint_labels(runs: MaskRuns, labels: torch.Tensor) -> None:
    """``labels``, a column-major ``(W, H)`` int32 plane filled with -1 by the caller, gets each pixel's
    top priority."""
    if runs.covered == 0:
        return
    table = torch.from_numpy(runs.table).to(labels.device, non_blocking=True)
    width, height = labels.shape
    grid = (triton.cdiv(runs.covered, PAINT_BLOCK),)
    _paint_labels_kernel[grid](table, runs.runs, runs.covered, labels, height, width,
                               max(0, runs.runs - 1).bit_length(), BLOCK=PAINT_BLOCK)


def launch_blend(frame: torch.Tensor, labels: torch.Tensor, colors: torch.Tensor, opacity: float,
                 region: tuple) -> None:
    """Blend ``frame`` (H, W, 3) uint8, in place, inside ``region`` = (x0, y0, x1, y1) exclusive;
    ``labels`` is the ``(W, H)`` plane, ``colors`` (N, 3) uint8 indexed by label."""
    x0, y0, x1, y1 = (int(v) for v in region)
    if x1 <= x0 or y1 <= y0:
        return
    grid = (triton.cdiv(y1 - y0, BLEND_TILE), triton.cdiv(x1 - x0, BLEND_TILE))
    _blend_kernel[grid](frame, labels, colors, x0, y0, x1, y1, labels.shape[1], frame.shape[1], float(opacity),
                        TILE=BLEND_TILE)

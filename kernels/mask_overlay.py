"""Mask overlay: paint instance masks, given as crop runs, into a BGR frame and blend with opacity.

What supervision's ``MaskAnnotator`` computes, on the GPU: every mask pixel takes the colour of the
mask painted last over it (the caller gives each mask a priority: higher wins), then
``out = colour * opacity + frame * (1 - opacity)`` rounded to uint8; pixels no mask covers keep their
value. Masks arrive as :class:`MaskRuns` - the foreground runs of each mask's crop, column-major as
``supervision.CompactMask`` stores them - so no full-frame mask is ever built.

Two launches: :func:`launch_paint_labels` writes, per pixel, the highest priority of the masks covering
it (``atomic_max`` into an int32 label plane, -1 = none); :func:`launch_blend` blends the labelled
pixels of a region of the frame in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PAINT_CHUNK = 4096 if _INTERPRET else 1024  # pixels of one run piece per program
BLEND_BLOCK = 1 << 16 if _INTERPRET else 1024  # pixels per blend program


@dataclass(frozen=True)
class MaskRuns:
    """Foreground runs of N mask crops, split into pieces of at most ``PAINT_CHUNK`` pixels.

    ``pieces`` is (P, 6) int32: ``[start, length, crop_h, x1, y1, priority]`` - ``start`` counts
    pixels column-major within the crop whose top-left corner sits at ``(x1, y1)`` of the frame.
    """

    pieces: np.ndarray

    @classmethod
    def from_crops(cls, rles, crop_shapes: np.ndarray, offsets: np.ndarray, priorities: np.ndarray) -> "MaskRuns":
        """From CompactMask-style run lengths (background first, alternating) per crop.

        Example:
            >>> runs = MaskRuns.from_crops([np.array([1, 2, 1])], np.array([[2, 2]]), np.array([[5, 7]]), np.array([0]))
            >>> runs.pieces.tolist()
            [[1, 2, 2, 5, 7, 0]]
        """
        edges = [np.cumsum(np.asarray(counts, dtype=np.int64)) for counts in rles]
        return cls.from_edges(edges, np.asarray(crop_shapes)[:, 0] if len(edges) else [], offsets, priorities)

    @classmethod
    def from_edges(cls, edges, crop_heights, offsets, priorities) -> "MaskRuns":
        """From run edges ``[start, stop, start, stop, ...]`` (column-major pixel positions, a trailing
        unpaired edge ignored) per mask, in a region ``crop_h`` tall whose top-left corner is at
        ``(x1, y1)``: a crop, or the whole frame at (0, 0) with the frame's height.

        Example:
            >>> runs = MaskRuns.from_edges([np.array([5, 7])], [4], np.array([[0, 0]]), np.array([3]))
            >>> runs.pieces.tolist()
            [[5, 2, 4, 0, 0, 3]]
        """
        # every mask's runs laid end to end and split in one pass: a frame holds tens of thousands of runs
        edges = [np.asarray(mask_edges, dtype=np.int64) for mask_edges in edges]
        runs = np.array([mask_edges.size // 2 for mask_edges in edges], dtype=np.int64)
        if runs.sum() == 0:
            return cls(np.zeros((0, 6), dtype=np.int32))
        paired = np.concatenate([mask_edges[:2 * count] for mask_edges, count in zip(edges, runs)])
        starts, ends = paired[0::2], paired[1::2]
        mask_of_piece = np.repeat(np.arange(len(edges)), runs)
        per_run = (ends - starts + PAINT_CHUNK - 1) // PAINT_CHUNK
        if per_run.max() > 1:  # long runs (a column's height and more) become several pieces
            run_of_piece = np.repeat(np.arange(starts.size), per_run)
            first_piece = np.cumsum(per_run) - per_run
            piece_start = starts[run_of_piece] + (np.arange(run_of_piece.size) - first_piece[run_of_piece]) * PAINT_CHUNK
            starts, ends, mask_of_piece = piece_start, ends[run_of_piece], mask_of_piece[run_of_piece]
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        pieces = np.empty((starts.size, 6), dtype=np.int32)
        pieces[:, 0] = starts
        pieces[:, 1] = np.minimum(ends - starts, PAINT_CHUNK)
        pieces[:, 2] = np.asarray(crop_heights, dtype=np.int64)[mask_of_piece]
        pieces[:, 3] = offsets[mask_of_piece, 0]
        pieces[:, 4] = offsets[mask_of_piece, 1]
        pieces[:, 5] = np.asarray(priorities, dtype=np.int64)[mask_of_piece]
        return cls(pieces)


@triton.jit
def _paint_labels_kernel(pieces_ptr, labels_ptr, height, width, CHUNK: tl.constexpr):
    piece = pieces_ptr + tl.program_id(0).to(tl.int64) * 6
    start = tl.load(piece + 0)
    length = tl.load(piece + 1)
    crop_h = tl.load(piece + 2)
    x1 = tl.load(piece + 3)
    y1 = tl.load(piece + 4)
    priority = tl.load(piece + 5)
    offs = tl.arange(0, CHUNK)
    position = start + offs
    ys = y1 + position % crop_h
    xs = x1 + position // crop_h
    live = (offs < length) & (ys < height) & (xs < width) & (ys >= 0) & (xs >= 0)
    index = ys.to(tl.int64) * width + xs
    tl.atomic_max(labels_ptr + index, priority + offs * 0, mask=live)


@triton.jit
def _rint(x):
    # without libdevice, which the interpreter lacks
    floor = tl.floor(x)
    diff = x - floor
    odd = (floor - 2.0 * tl.floor(floor * 0.5)) != 0.0
    return tl.where((diff > 0.5) | ((diff == 0.5) & odd), floor + 1.0, floor)


@triton.jit
def _blend_kernel(frame_ptr, labels_ptr, colors_ptr, x0, y0, region_w, region_pixels, width, opacity,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < region_pixels
    index = (y0 + offs // region_w) * width + x0 + offs % region_w
    label = tl.load(labels_ptr + index, mask=live, other=-1)
    painted = live & (label >= 0)
    colour = colors_ptr + tl.maximum(label, 0) * 3
    keep = 1.0 - opacity
    for channel in tl.static_range(3):
        pixel = frame_ptr + index * 3 + channel
        value = tl.load(pixel, mask=painted, other=0).to(tl.float32)
        paint = tl.load(colour + channel, mask=painted, other=0).to(tl.float32)
        mixed = paint * opacity + value * keep
        rounded = _rint(mixed)  # round half to even, as cv2.addWeighted's saturate_cast does
        tl.store(pixel, tl.minimum(tl.maximum(rounded, 0.0), 255.0).to(tl.uint8), mask=painted)


def launch_paint_labels(runs: MaskRuns, labels: torch.Tensor) -> None:
    """``labels`` (H, W) int32, filled with -1 by the caller, gets each pixel's top priority."""
    if runs.pieces.shape[0] == 0:
        return
    pieces = torch.from_numpy(runs.pieces).to(labels.device, non_blocking=True)
    height, width = labels.shape
    _paint_labels_kernel[(runs.pieces.shape[0],)](pieces, labels, height, width, CHUNK=PAINT_CHUNK)


def launch_blend(frame: torch.Tensor, labels: torch.Tensor, colors: torch.Tensor, opacity: float,
                 region: tuple) -> None:
    """Blend ``frame`` (H, W, 3) uint8, in place, inside ``region`` = (x0, y0, x1, y1) exclusive;
    ``colors`` (N, 3) uint8 indexed by label."""
    x0, y0, x1, y1 = (int(v) for v in region)
    region_w, region_h = x1 - x0, y1 - y0
    if region_w <= 0 or region_h <= 0:
        return
    pixels = region_w * region_h
    _blend_kernel[(triton.cdiv(pixels, BLEND_BLOCK),)](
        frame, labels, colors, x0, y0, region_w, pixels, frame.shape[1], float(opacity), BLOCK=BLEND_BLOCK,
    )

"""Dense masks of the fused RF-DETR postprocess: per-mask extents, then bit-packed crops.

An extent pass finds each mask's foreground bounding box (cheap: most tiles are decided
from the mask grid alone), then only those byte-aligned crops are bit-packed (bit ``j``
of byte ``k`` = pixel ``8k+j``) and copied to the host, where they are unpacked into a
zeroed ``(N, H, W)`` bool array. The device->host copy is 8x smaller than a bool crop
and much smaller than full frames. Pixels come from the exact resize of
``mask_resize.py``.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from inference_fastpath.kernels.postprocess_select import COL_QUERY, HEADER_WORDS, ROW_WORDS

from inference_fastpath.kernels.mask_resize import (
    MaskPlan,
    _eval_mask_pixels,
    _tile_uniform,
    window_size,
)


# Dense tile: rows x bytes (8 pixels each). Bigger in the interpreter (CPU tests), which
# pays per operation rather than per element.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DENSE_ROWS = 128 if _INTERPRET else 32
DENSE_BYTES = 32 if _INTERPRET else 16
# Programs per detection of the pack kernel (they stride over the crop's tiles).
DENSE_PROGRAMS_PER_MASK = 2 if _INTERPRET else 16
# Extent pass tile (rows x columns).
EXTENT_ROWS = 512 if _INTERPRET else 64
EXTENT_COLS = 256 if _INTERPRET else 64
# where a detection's query index sits in SelectionBuffer.packed (kernels read it there,
# so no host round trip is needed between selection and mask kernels)
SEL_QUERY_WORD = tl.constexpr(HEADER_WORDS + COL_QUERY)
SEL_ROW_WORDS = tl.constexpr(ROW_WORDS)

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _extent_kernel(
    masks_ptr, bin_ptr, sel_ptr, n_out_ptr, ext_ptr,
    Q, mh, mw, crop_top, crop_left, crop_h, crop_w, th, tw, oy, ox, Hc, Wc,
    ytab, xtab,
    BY: tl.constexpr, BX: tl.constexpr, MAXT: tl.constexpr, MODE: tl.constexpr,
    SRC_BIN: tl.constexpr, WR: tl.constexpr, WC: tl.constexpr,
):
    """Foreground bounding box [ymin, ymax, xmin, xmax] of detection ``program_id(0)``
    within the band of columns ``program_id(1)`` (ymin > ymax when empty)."""
    i = tl.program_id(0)
    band = tl.program_id(1)
    out = ext_ptr + (i.to(tl.int64) * tl.num_programs(1) + band) * 4
    zero = i * 0  # int32 tensors, so the loop-carried values keep one type
    ymin = zero + Hc
    ymax = zero - 1
    xmin = zero + Wc
    xmax = zero - 1
    if i < tl.load(n_out_ptr):
        x0 = band * BX
        xs = x0 + tl.arange(0, BX)[None, :]
        x_end = tl.minimum(x0 + BX, Wc)
        query = tl.load(sel_ptr + SEL_QUERY_WORD + i * SEL_ROW_WORDS)
        gbase = masks_ptr + query.to(tl.int64) * mh * mw
        bbase = bin_ptr + i.to(tl.int64) * th * tw
        for y0 in range(0, Hc, BY):
            y_end = tl.minimum(y0 + BY, Hc)
            uniform, value = _tile_uniform(gbase, y0, y_end, x0, x_end, mw, crop_top, crop_left,
                                           crop_h, crop_w, th, tw, oy, ox, ytab, xtab, MAXT, WR, WC,
                                           SRC_BIN)
            if uniform:
                if value != 0:
                    ymin = tl.minimum(ymin, y0)
                    ymax = tl.maximum(ymax, y_end - 1)
                    xmin = tl.minimum(xmin, x0)
                    xmax = tl.maximum(xmax, x_end - 1)
            else:
                ys = y0 + tl.arange(0, BY)[:, None]
                fg = _eval_mask_pixels(gbase, bbase, ys, xs, mw, crop_top, crop_left, crop_h, crop_w,
                                       th, tw, oy, ox, ytab, xtab, MAXT, MODE, SRC_BIN)
                fg = fg & (ys < Hc) & (xs < Wc)
                ymin = tl.minimum(ymin, tl.min(tl.where(fg, ys, Hc)))
                ymax = tl.maximum(ymax, tl.max(tl.where(fg, ys, -1)))
                xmin = tl.minimum(xmin, tl.min(tl.where(fg, xs, Wc)))
                xmax = tl.maximum(xmax, tl.max(tl.where(fg, xs, -1)))
    tl.store(out + 0, ymin)
    tl.store(out + 1, ymax)
    tl.store(out + 2, xmin)
    tl.store(out + 3, xmax)


@triton.jit
def _dense_pack_kernel(
    masks_ptr, bin_ptr, sel_ptr, n_out_ptr, crops_ptr, out_ptr, out_limit,
    Q, mh, mw, crop_top, crop_left, crop_h, crop_w, th, tw, oy, ox, Hc, Wc,
    ytab, xtab,
    BY: tl.constexpr, BXB: tl.constexpr, MAXT: tl.constexpr, MODE: tl.constexpr,
    SRC_BIN: tl.constexpr, WR: tl.constexpr, WC: tl.constexpr,
):
    """Bit-packed crop of detection ``program_id(0)``'s canvas.

    ``crops_ptr[i] = [out_offset, y0, first_byte, rows, bytes]`` (int32): rows
    ``y0 .. y0+rows`` and pixel columns ``8*first_byte .. 8*(first_byte+bytes)`` go to
    ``out[out_offset:]`` row-major, ``bytes`` per row, bit j of a byte = pixel 8k+j.
    The ``num_programs(1)`` programs of a detection stride over its (BY x BXB) tiles, so
    the grid does not depend on crop sizes (no host round trip before the launch); rows
    >= n_out do nothing and nothing is written at or past ``out_limit``.
    """
    i = tl.program_id(0)
    if i < tl.load(n_out_ptr):
        crop = crops_ptr + i.to(tl.int64) * 5
        out_off = tl.load(crop + 0).to(tl.int64)
        cy0 = tl.load(crop + 1)
        cb0 = tl.load(crop + 2)
        rows = tl.load(crop + 3)
        nbytes = tl.load(crop + 4)
        byte_tiles = tl.cdiv(nbytes, BXB)
        tiles = tl.cdiv(rows, BY) * byte_tiles
        query = tl.load(sel_ptr + SEL_QUERY_WORD + i * SEL_ROW_WORDS)
        gbase = masks_ptr + query.to(tl.int64) * mh * mw
        bbase = bin_ptr + i.to(tl.int64) * th * tw
        for t in range(tl.program_id(1), tiles, tl.num_programs(1)):
            ty0 = (t // byte_tiles) * BY
            tb0 = (t % byte_tiles) * BXB
            y0 = cy0 + ty0
            bx0 = cb0 + tb0
            ys = y0 + tl.arange(0, BY)[:, None]
            xs = bx0 * 8 + tl.arange(0, BXB * 8)[None, :]
            x_end = tl.minimum(bx0 * 8 + BXB * 8, Wc)
            uniform, value = _tile_uniform(gbase, y0, tl.minimum(y0 + BY, Hc), bx0 * 8, x_end, mw,
                                           crop_top, crop_left, crop_h, crop_w, th, tw, oy, ox, ytab,
                                           xtab, MAXT, WR, WC, SRC_BIN)
            if uniform:
                v = ((ys * 0 + value) != 0) & (xs < Wc)
            else:
                v = _eval_mask_pixels(gbase, bbase, ys, xs, mw, crop_top, crop_left, crop_h, crop_w,
                                      th, tw, oy, ox, ytab, xtab, MAXT, MODE, SRC_BIN) & (xs < Wc)
            bits = tl.reshape(v.to(tl.int32), (BY, BXB, 8)) << tl.arange(0, 8)[None, None, :]
            packed = tl.sum(bits, axis=2)
            rel_y = ys - cy0
            rel_b = bx0 - cb0 + tl.arange(0, BXB)[None, :]
            index = out_off + rel_y.to(tl.int64) * nbytes + rel_b
            tl.store(out_ptr + index, packed.to(tl.uint8),
                     mask=(rel_y < rows) & (rel_b < nbytes) & (index < out_limit))


# ----------------------------------------------------------------------------- host API


def _frame_args(masks_b: torch.Tensor, bin_b: Optional[torch.Tensor], plan: MaskPlan) -> tuple:
    g = plan.geometry
    return (
        masks_b, bin_b if bin_b is not None else masks_b,
    ), (
        masks_b.shape[0], plan.mask_h, plan.mask_w, g.crop_top, g.crop_left, g.crop_h, g.crop_w,
        g.target_h, g.target_w, g.offset_y, g.offset_x, plan.canvas[0], plan.canvas[1],
        plan.ytab, plan.xtab,
    )


def extent_bands(plan: MaskPlan) -> Tuple[int, int, int]:
    """(bands, BY, BX) of :func:`launch_extents` for a frame."""
    Hc, Wc = plan.canvas
    BY = min(EXTENT_ROWS, triton.next_power_of_2(Hc))
    BX = min(EXTENT_COLS, triton.next_power_of_2(Wc))
    return triton.cdiv(Wc, BX), BY, BX


def launch_extents(masks_b: torch.Tensor, bin_b: Optional[torch.Tensor], selection_row: torch.Tensor,
                   capacity: int, plan: MaskPlan, out: torch.Tensor, mode: int) -> None:
    """Per (detection, column band) foreground boxes into ``out`` (capacity, bands, 4) int32.

    Rows >= n_out (read on device from ``selection_row``) report empty boxes, so no host
    sync is needed between selection and this pass. Reduce over bands with
    :func:`reduce_extents`.
    """
    g = plan.geometry
    bands, BY, BX = extent_bands(plan)
    ptrs, scalars = _frame_args(masks_b, bin_b, plan)
    _extent_kernel[(capacity, bands)](
        *ptrs, selection_row, selection_row[0:1], out, *scalars,
        BY=BY, BX=BX, MAXT=plan.max_taps, MODE=max(mode, 0), SRC_BIN=plan.binary_source,
        WR=window_size(BY, g.crop_h, g.target_h, plan.max_taps),
        WC=window_size(BX, g.crop_w, g.target_w, plan.max_taps),
        enable_fp_fusion=False,
    )


def reduce_extents(per_band: torch.Tensor) -> torch.Tensor:
    """(capacity, bands, 4) -> (capacity, 4) [ymin, ymax, xmin, xmax] on device."""
    lo = per_band[..., 0::2].amin(dim=1)
    hi = per_band[..., 1::2].amax(dim=1)
    return torch.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], dim=1).to(torch.int32)


def device_crop_layout(extents: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Device: per detection ``[out_offset, y0, first_byte, rows, bytes]`` (int32) from
    (N, 4) extents and the (N,) int64 canvas width of each row's frame; crops are laid out
    back to back in row order (rows of several frames may be concatenated). Crops are
    byte aligned (whole bytes of 8 canvas pixels); empty masks (and rows past a frame's
    detections, whose extents are empty) get zeros."""
    ext = extents.to(torch.int64)
    ymin, ymax, xmin, xmax = ext.unbind(1)
    valid = (ymax >= ymin) & (xmax >= xmin)
    first = torch.div(xmin, 8, rounding_mode="floor")
    last = torch.minimum(torch.div(xmax, 8, rounding_mode="floor"), torch.div(widths + 7, 8, rounding_mode="floor") - 1)
    rows = torch.where(valid, ymax - ymin + 1, 0)
    nbytes = torch.where(valid, last - first + 1, 0)
    sizes = rows * nbytes
    offsets = torch.cumsum(sizes, 0) - sizes
    layout = torch.stack(
        [torch.where(valid, offsets, 0), torch.where(valid, ymin, 0), torch.where(valid, first, 0), rows, nbytes],
        dim=1,
    )
    return layout.to(torch.int32)


def launch_dense_pack(masks_b: torch.Tensor, bin_b: Optional[torch.Tensor], selection_row: torch.Tensor,
                      capacity: int, crops: torch.Tensor, plan: MaskPlan, out: torch.Tensor,
                      mode: int) -> None:
    """Pack one frame's crops (``crops``: (capacity, 5) int32 from :func:`device_crop_layout`)
    into ``out`` (uint8); nothing is written past ``out``'s end.

    Args:
        masks_b: (Q, mh, mw) mask logits of the frame.
        bin_b: (R, th, tw) uint8 from :func:`binarize_with_torch` when ``plan.binary_source``.
        selection_row: the frame's row of ``SelectionBuffer.packed`` (device, int32).
    """
    g = plan.geometry
    BY, BXB = DENSE_ROWS, DENSE_BYTES
    ptrs, scalars = _frame_args(masks_b, bin_b, plan)
    _dense_pack_kernel[(capacity, DENSE_PROGRAMS_PER_MASK)](
        *ptrs, selection_row, selection_row[0:1], crops, out, out.numel(), *scalars,
        BY=BY, BXB=BXB, MAXT=plan.max_taps, MODE=max(mode, 0), SRC_BIN=plan.binary_source,
        WR=window_size(BY, g.crop_h, g.target_h, plan.max_taps),
        WC=window_size(BXB * 8, g.crop_w, g.target_w, plan.max_taps),
        enable_fp_fusion=False,
    )


def paste_crops(packed: np.ndarray, layout: np.ndarray, height: int, width: int,
                out: Optional[np.ndarray] = None) -> np.ndarray:
    """Host: (N, H, W) bool canvas from the packed crops (untouched pixels stay False).
    ``out``: a zeroed (N, H, W) bool array to paste into instead of a new one."""
    n = layout.shape[0]
    masks = np.zeros((n, height, width), dtype=bool) if out is None else out
    for i, (offset, y0, first, rows, nbytes) in enumerate(layout.tolist()):
        if rows == 0:
            continue
        block = packed[offset : offset + rows * nbytes].reshape(rows, nbytes)
        x0 = first * 8
        count = min(nbytes * 8, width - x0)
        bits = np.unpackbits(block, axis=1, count=count, bitorder="little")
        masks[i, y0 : y0 + rows, x0 : x0 + count] = bits.view(bool)
    return masks

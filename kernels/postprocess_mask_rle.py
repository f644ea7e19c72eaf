"""COCO RLE of the fused RF-DETR masks, straight from the mask logits.

COCO uncompressed RLE walks the mask column by column (column-major) and starts
with a background run. Its counts are fully described by the *transition
positions* ``k = x * H + y`` where the pixel differs from the previous one in that
order (the pixel before the first is background). The kernels here produce exactly
those positions, evaluating pixels with the shared exact resize
(``_eval_mask_pixels``), without ever writing a full-resolution mask:

* one program per (detection, band of columns) walks the band top to bottom in
  chunks; chunks whose mask-grid support is all positive / all non-positive are
  decided without evaluating pixels (only their first row can hold a transition);
* pass 1 counts transitions per column, a cumsum turns counts into write offsets,
  pass 2 writes the positions in COCO order.

The compressed COCO strings are coded from these positions on the device too
(``postprocess_rle_string.py``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from inference_fastpath.kernels.mask_resize import MaskPlan, _eval_mask_pixels, _tile_uniform, window_size
from inference_fastpath.kernels.postprocess_mask_dense import SEL_QUERY_WORD, SEL_ROW_WORDS

# Columns per program / rows per step. The interpreter (CPU tests) pays per operation,
# not per element, so it gets larger blocks; the logic is identical.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RLE_BAND = 256 if _INTERPRET else 32
RLE_CHUNK = 512 if _INTERPRET else 64


@triton.jit
def _rle_kernel(
    masks_ptr, bin_ptr, sel_ptr, n_out_ptr, counts_ptr, offsets_ptr, pos_ptr, pos_limit,
    Q, mh, mw, crop_top, crop_left, crop_h, crop_w, th, tw, oy, ox, Hc, Wc,
    ytab, xtab,
    EMIT: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr, MAXT: tl.constexpr,
    MODE: tl.constexpr, SRC_BIN: tl.constexpr, WR: tl.constexpr, WC: tl.constexpr,
):
    """Pass 1 (EMIT=False): transitions per column -> counts[i, x].
    Pass 2 (EMIT=True): transition positions, written from offsets[i, x]; positions at or
    beyond ``pos_limit`` are not written (the host sees the total and sizes up)."""
    i = tl.program_id(0)
    if i < tl.load(n_out_ptr):
        x0 = tl.program_id(1) * BX
        xs = x0 + tl.arange(0, BX)
        xvalid = xs < Wc
        query = tl.load(sel_ptr + SEL_QUERY_WORD + i * SEL_ROW_WORDS)
        gbase = masks_ptr + query.to(tl.int64) * mh * mw
        bbase = bin_ptr + i.to(tl.int64) * th * tw
        x_end = tl.minimum(x0 + BX, Wc)
        col_row = i.to(tl.int64) * Wc + xs
        # the pixel before (0, x) in column-major order is (Hc - 1, x - 1)
        prev = _eval_mask_pixels(gbase, bbase, Hc - 1 + xs * 0, xs - 1, mw, crop_top, crop_left,
                                 crop_h, crop_w, th, tw, oy, ox, ytab, xtab, MAXT, MODE,
                                 SRC_BIN) & (xs > 0)
        prev = prev.to(tl.int32)
        total = tl.zeros([BX], dtype=tl.int32)
        wptr = tl.zeros([BX], dtype=tl.int64)
        if EMIT:
            wptr = tl.load(offsets_ptr + col_row, mask=xvalid, other=0)
        for y0 in range(0, Hc, BY):
            uniform, value = _tile_uniform(gbase, y0, tl.minimum(y0 + BY, Hc), x0, x_end, mw,
                                           crop_top, crop_left, crop_h, crop_w, th, tw, oy, ox,
                                           ytab, xtab, MAXT, WR, WC, SRC_BIN)
            if uniform:
                trans1 = (prev != value) & xvalid
                if EMIT:
                    tl.store(pos_ptr + wptr, (xs * Hc + y0).to(tl.int32), mask=trans1 & (wptr < pos_limit))
                    wptr += trans1.to(tl.int64)
                total += trans1.to(tl.int32)
                prev = prev * 0 + value
            else:
                ys = y0 + tl.arange(0, BY)[:, None]
                cols = xs[None, :]
                cur = _eval_mask_pixels(gbase, bbase, ys, cols, mw, crop_top, crop_left, crop_h,
                                        crop_w, th, tw, oy, ox, ytab, xtab, MAXT, MODE, SRC_BIN)
                # row above each pixel: shift `cur` down one row with a 0/1 matrix product
                # (exact for 0/1 values); the chunk's first row uses the carried value
                shift = (tl.arange(0, BY)[None, :] == tl.arange(0, BY)[:, None] - 1).to(tl.float32)
                above = tl.dot(shift, cur.to(tl.float32)) > 0.5
                first_row = ys == y0
                above = tl.where(first_row, prev[None, :] != 0, above)
                trans = (cur != above) & (ys < Hc) & xvalid[None, :]
                t32 = trans.to(tl.int32)
                if EMIT:
                    rank = tl.cumsum(t32, axis=0) - t32
                    dst = wptr[None, :] + rank.to(tl.int64)
                    tl.store(pos_ptr + dst, (cols * Hc + ys).to(tl.int32), mask=trans & (dst < pos_limit))
                    wptr += tl.sum(t32, axis=0).to(tl.int64)
                total += tl.sum(t32, axis=0)
                last = (ys == y0 + BY - 1) & (ys < Hc)
                tail = tl.sum(tl.where(last, cur.to(tl.int32), 0), axis=0)
                has_tail = tl.sum(last.to(tl.int32), axis=0) > 0
                prev = tl.where(has_tail, tail, prev)
        if not EMIT:
            tl.store(counts_ptr + col_row, total, mask=xvalid)


def _launch(pass_emit: bool, masks_b, bin_b, sel_row, capacity: int, plan: MaskPlan,
            counts, offsets, positions, pos_limit: int, mode: int) -> None:
    g = plan.geometry
    Hc, Wc = plan.canvas
    # no bigger than the canvas; >= 16 for tl.dot
    BY = max(16, min(RLE_CHUNK, triton.next_power_of_2(Hc)))
    BX = max(16, min(RLE_BAND, triton.next_power_of_2(Wc)))
    WR = window_size(BY, g.crop_h, g.target_h, plan.max_taps)
    WC = window_size(BX, g.crop_w, g.target_w, plan.max_taps)
    grid = (capacity, triton.cdiv(Wc, BX))
    _rle_kernel[grid](
        masks_b, bin_b if bin_b is not None else masks_b, sel_row, sel_row[0:1], counts, offsets,
        positions, pos_limit,
        masks_b.shape[0], plan.mask_h, plan.mask_w, g.crop_top, g.crop_left, g.crop_h, g.crop_w,
        g.target_h, g.target_w, g.offset_y, g.offset_x, Hc, Wc, plan.ytab, plan.xtab,
        EMIT=pass_emit, BX=BX, BY=BY, MAXT=plan.max_taps, MODE=max(mode, 0),
        SRC_BIN=plan.binary_source, WR=WR, WC=WC, enable_fp_fusion=False,
    )


def launch_rle_count(masks_b: torch.Tensor, bin_b: Optional[torch.Tensor], sel_row: torch.Tensor,
                     capacity: int, plan: MaskPlan, counts: torch.Tensor, mode: int) -> None:
    """Pass 1 for one frame. ``counts`` is (capacity, Wc) int32 and must be zeroed;
    programs for rows >= n_out (read on device from ``sel_row``) do nothing, so no
    host sync is needed between selection and this pass."""
    _launch(False, masks_b, bin_b, sel_row, capacity, plan, counts, counts, counts, 0, mode)


def launch_rle_emit(masks_b: torch.Tensor, bin_b: Optional[torch.Tensor], sel_row: torch.Tensor,
                    capacity: int, plan: MaskPlan, offsets: torch.Tensor, positions: torch.Tensor,
                    mode: int) -> None:
    """Pass 2 for one frame: ``offsets`` (capacity, Wc) int64 exclusive starts into
    ``positions``; rows >= n_out do nothing and nothing is written past ``positions``'
    end, so the launch needs no host-side count (it can sit in a CUDA graph)."""
    _launch(True, masks_b, bin_b, sel_row, capacity, plan, offsets, offsets, positions,
            positions.numel(), mode)


# ----------------------------------------------------------------------------- host side

"""Mask core of the fused RF-DETR postprocess: exact resize taps + dense bit-packed masks.

The reference (inference-models ``align_instance_segmentation_results``) crops the
letterbox band off the (e.g. 78x78) mask logits, resizes them with
``torchvision.transforms.functional.resize(..., BILINEAR)`` - which is PyTorch's
*antialiased* bilinear resize (``antialias=True`` is torchvision's default) - and
thresholds with ``> 0``. When upsampling, that filter has the same 2-tap support as
plain bilinear but a different float recipe: per output coordinate, tent weights
are computed and normalised by their sum, then rows are combined horizontally (stored
as float32) and the results vertically, accumulating ``acc = t0*w0; acc += t1*w1``.

Here:

* :func:`probe_axis_taps` reads the per-row / per-column taps (first source index +
  up to 3 float32 weights) back from torch's own resize on the target device, once per
  geometry; :func:`axis_taps` replays the same weight formula in numpy (documentation
  and a test cross-check).
* ``_eval_mask_pixels`` (a Triton device function shared with the RLE kernels)
  evaluates any canvas pixel straight from the mask logits: no full-resolution float
  mask is ever materialised.
* How the compiled reference rounds ``acc += t*w`` (one FMA, or two roundings) is a
  property of the torch build and device, so :func:`calibrate_accumulation` compares
  the candidates against torch's own resize once per device and keeps the exact one.
  A torch build that adds its taps in an order not recorded here gets the closest
  recipe in a stated near-exact mode (:class:`AccumulationRecipe`).
* Axes that *shrink* (frames smaller than the mask grid) use a wide antialias filter;
  those frames are small by definition, so they are resized with torch itself
  (bit-identical by construction) and the kernels only read the binarised result.

Dense output: an extent pass finds each mask's foreground bounding box (cheap: most
tiles are decided from the mask grid alone), then only those byte-aligned crops are
bit-packed (bit ``j`` of byte ``k`` = pixel ``8k+j``) and copied to the host, where
they are unpacked into a zeroed ``(N, H, W)`` bool array. The device->host copy is 8x
smaller than a bool crop and much smaller than full frames.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl
from torchvision.transforms import functional as tvf

from inference_fastpath.kernels.postprocess_select import (
    COL_QUERY,
    HEADER_WORDS,
    ROW_WORDS,
    FrameGeometry,
)

# Accumulation recipes for ``acc = t0*w0; acc += t1*w1 (+ t2*w2)``.
ACC_FMA_SEQUENTIAL = 0  # acc = fma(t1, w1, round(t0*w0))       (x86 PyTorch, nvcc loop form)
ACC_FMA_FIRST = 1  # acc = fma(t0, w0, round(t1*w1))            (contraction of an unrolled sum)
ACC_NO_FMA = 2  # acc = round(round(t0*w0) + round(t1*w1))
ACC_MODES = (ACC_FMA_SEQUENTIAL, ACC_FMA_FIRST, ACC_NO_FMA)

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
# The interpreter evaluates tl.fma as a*b+c with two float32 roundings, so the FMA recipes
# would never match a torch build that fuses; _fma rebuilds a single rounding there.
_EMULATE_FMA = tl.constexpr(_INTERPRET)


# ----------------------------------------------------------------------------- tap tables


def axis_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, int]:
    """Taps of the reference resize along one axis, for ``out_size >= in_size``.

    Returns ``(table, max_taps)`` where ``table`` is (out_size, 4) float32 rows
    ``[first_input_index, w0, w1, w2]`` (unused weights are 0), replaying PyTorch's
    antialiased-bilinear weight computation in float32.
    """
    if out_size < in_size:
        raise ValueError("axis_taps only covers upsampling (and identity)")
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)  # area_pixel_compute_scale, align_corners=False
    support = f32(1.0)  # bilinear size 2 * 0.5; scale <= 1 so no widening
    invscale = f32(1.0)
    i = np.arange(out_size)
    center = scale * (i.astype(f32) + f32(0.5))
    xmin = np.maximum(((center - support) + f32(0.5)).astype(np.int64), 0)  # C cast truncates
    xmax = np.minimum(((center + support) + f32(0.5)).astype(np.int64), in_size)
    xsize = np.clip(xmax - xmin, 0, 3)
    xmin_m_center = xmin.astype(f32) - center
    weights = np.zeros((out_size, 3), dtype=f32)
    total = np.zeros(out_size, dtype=f32)
    for j in range(3):
        arg = ((f32(j) + xmin_m_center) + f32(0.5)) * invscale
        arg = np.abs(arg)
        w = np.where(arg < f32(1.0), f32(1.0) - arg, f32(0.0)).astype(f32)
        w = np.where(j < xsize, w, f32(0.0)).astype(f32)
        weights[:, j] = w
        total = (total + w).astype(f32)  # sequential float32 sum, as the reference
    nz = total != 0
    weights[nz] = weights[nz] / total[nz, None]
    table = np.zeros((out_size, 4), dtype=f32)
    table[:, 0] = xmin
    table[:, 1:] = weights
    return table, int(max(1, xsize.max(initial=1)))


def probe_axis_taps(in_size: int, out_size: int, device: torch.device) -> Tuple[np.ndarray, int]:
    """Same table as :func:`axis_taps`, read back from torch's own resize on ``device``.

    Resizing the identity basis along one axis returns each output's stored float32
    weights exactly (one non-zero product per sum), so the tables used on a device are
    the weights torch itself uses there - independent of how its compiler rounds the
    weight formula. Zero weights are dropped; they never change the result.
    """
    eye = torch.eye(in_size, device=device, dtype=torch.float32)[:, None, None, :]
    probe = torch.nn.functional.interpolate(
        eye, size=(1, out_size), mode="bilinear", align_corners=False, antialias=True
    )[:, 0, 0, :].cpu().numpy()  # (in, out)
    nonzero = probe != 0
    first = nonzero.argmax(axis=0)
    last = in_size - 1 - nonzero[::-1].argmax(axis=0)
    taps = last - first + 1
    if taps.max(initial=1) > 3:
        raise ValueError("resize uses more than 3 taps (not an upsampling axis)")
    table = np.zeros((out_size, 4), dtype=np.float32)
    table[:, 0] = first
    cols = np.arange(out_size)
    for j in range(3):
        rows = np.minimum(first + j, in_size - 1)
        table[:, 1 + j] = np.where(j < taps, probe[rows, cols], 0.0)
    return table, int(taps.max(initial=1))


@dataclass
class MaskPlan:
    """Everything the mask kernels need for one frame (geometry + device tap tables)."""

    geometry: FrameGeometry
    mask_h: int
    mask_w: int
    binary_source: bool  # True: a torch-resized, binarised (R, th, tw) mask is read instead
    ytab: torch.Tensor
    xtab: torch.Tensor
    max_taps: int

    @property
    def canvas(self) -> Tuple[int, int]:
        return self.geometry.canvas_h, self.geometry.canvas_w


_TABLE_CACHE: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor, int]] = {}


def make_mask_plan(geometry: FrameGeometry, mask_h: int, mask_w: int, device: torch.device) -> MaskPlan:
    """Mask plan of one frame; tap tables are cached per (crop, target, device)."""
    g = geometry
    binary = g.target_h < g.crop_h or g.target_w < g.crop_w
    key = (g.crop_h, g.crop_w, g.target_h, g.target_w, str(device), binary)
    cached = _TABLE_CACHE.get(key)
    if cached is None:
        if binary:
            dummy = torch.zeros((1, 4), dtype=torch.float32, device=device)
            cached = (dummy, dummy, 1)
        else:
            ytab, ty = probe_axis_taps(g.crop_h, g.target_h, device)
            xtab, tx = probe_axis_taps(g.crop_w, g.target_w, device)
            cached = (
                torch.from_numpy(ytab).to(device),
                torch.from_numpy(xtab).to(device),
                max(ty, tx),
            )
        if len(_TABLE_CACHE) > 64:
            _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = cached
    ytab, xtab, taps = cached
    return MaskPlan(g, mask_h, mask_w, binary, ytab, xtab, taps)


def binarize_with_torch(masks: torch.Tensor, queries: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
    """(R, th, tw) uint8 masks for the given queries, resized by torch like the reference.

    Used when an axis shrinks (frame smaller than the mask grid).
    """
    g = plan.geometry
    q = queries.long().clamp_(0, masks.shape[0] - 1)
    crop = masks.index_select(0, q)[
        :, g.crop_top : g.crop_top + g.crop_h, g.crop_left : g.crop_left + g.crop_w
    ]
    resized = tvf.resize(crop, [g.target_h, g.target_w], interpolation=tvf.InterpolationMode.BILINEAR)
    return (resized > 0).to(torch.uint8).contiguous()


# ----------------------------------------------------------------------------- device functions


@triton.jit
def _fma(a, b, c):
    """float32 ``a*b + c`` rounded once, also under the interpreter."""
    if _EMULATE_FMA:
        # a*b is exact in float64; the float64 sum is rounded to odd (an inexact result gets an
        # odd last bit), after which rounding to float32 is the correctly rounded fma
        p = a.to(tl.float64) * b.to(tl.float64)
        c64 = c.to(tl.float64)
        s = p + c64
        bb = s - p
        err = (p - (s - bb)) + (c64 - bb)  # TwoSum: the exact rounding error of s
        bits = s.to(tl.int64, bitcast=True)
        step = tl.where((err > 0.0) == (s > 0.0), 1, -1).to(tl.int64)  # one ulp toward the exact sum
        bits = tl.where((err != 0.0) & ((bits & 1) == 0), bits + step, bits)
        return bits.to(tl.float64, bitcast=True).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _combine(t0, t1, t2, w0, w1, w2, MAXT: tl.constexpr, MODE: tl.constexpr):
    """acc = t0*w0 + t1*w1 (+ t2*w2) rounded the way the reference resize does."""
    if MODE == 1:
        acc = tl.where(w1 != 0.0, _fma(t0, w0, t1 * w1), t0 * w0)
    else:
        acc = t0 * w0
        if MAXT >= 2:
            if MODE == 0:
                nxt = _fma(t1, w1, acc)
            else:
                nxt = acc + t1 * w1
            acc = tl.where(w1 != 0.0, nxt, acc)
    if MAXT >= 3:
        if MODE == 2:
            nxt3 = acc + t2 * w2
        else:
            nxt3 = _fma(t2, w2, acc)
        acc = tl.where(w2 != 0.0, nxt3, acc)
    return acc


@triton.jit
def _hrow(gbase, row, c0, c1, c2, wx0, wx1, wx2, mw, MAXT: tl.constexpr, MODE: tl.constexpr):
    rb = gbase + row * mw
    t0 = tl.load(rb + c0).to(tl.float32)
    t1 = t0
    t2 = t0
    if MAXT >= 2:
        t1 = tl.load(rb + c1).to(tl.float32)
    if MAXT >= 3:
        t2 = tl.load(rb + c2).to(tl.float32)
    return _combine(t0, t1, t2, wx0, wx1, wx2, MAXT, MODE)


@triton.jit
def _interp_logits(gbase, mw, crop_top, crop_left, crop_h, crop_w, ytab, xtab, tyc, txc,
                   MAXT: tl.constexpr, MODE: tl.constexpr):
    """Resized logit at target pixels (tyc, txc) (already clamped into the target)."""
    yrow = ytab + tyc * 4
    ymin = tl.load(yrow).to(tl.int32)
    wy0 = tl.load(yrow + 1)
    wy1 = tl.load(yrow + 2)
    wy2 = tl.load(yrow + 3)
    xrow = xtab + txc * 4
    xmin = tl.load(xrow).to(tl.int32)
    wx0 = tl.load(xrow + 1)
    wx1 = tl.load(xrow + 2)
    wx2 = tl.load(xrow + 3)
    c0 = crop_left + xmin
    c1 = crop_left + tl.minimum(xmin + 1, crop_w - 1)
    c2 = crop_left + tl.minimum(xmin + 2, crop_w - 1)
    r0 = crop_top + ymin
    h0 = _hrow(gbase, r0, c0, c1, c2, wx0, wx1, wx2, mw, MAXT, MODE)
    h1 = h0
    h2 = h0
    if MAXT >= 2:
        r1 = crop_top + tl.minimum(ymin + 1, crop_h - 1)
        h1 = _hrow(gbase, r1, c0, c1, c2, wx0, wx1, wx2, mw, MAXT, MODE)
    if MAXT >= 3:
        r2 = crop_top + tl.minimum(ymin + 2, crop_h - 1)
        h2 = _hrow(gbase, r2, c0, c1, c2, wx0, wx1, wx2, mw, MAXT, MODE)
    return _combine(h0, h1, h2, wy0, wy1, wy2, MAXT, MODE)


@triton.jit
def _eval_mask_pixels(gbase, bbase, ys, xs, mw, crop_top, crop_left, crop_h, crop_w, th, tw, oy, ox,
                      ytab, xtab, MAXT: tl.constexpr, MODE: tl.constexpr, SRC_BIN: tl.constexpr):
    """Binary mask value at canvas pixels (ys, xs) (broadcastable int32 tensors)."""
    ty = ys - oy
    tx = xs - ox
    inside = (ty >= 0) & (ty < th) & (tx >= 0) & (tx < tw)
    tyc = tl.minimum(tl.maximum(ty, 0), th - 1)
    txc = tl.minimum(tl.maximum(tx, 0), tw - 1)
    if SRC_BIN:
        v = tl.load(bbase + tyc * tw + txc) != 0
    else:
        v = _interp_logits(gbase, mw, crop_top, crop_left, crop_h, crop_w, ytab, xtab, tyc, txc,
                           MAXT, MODE) > 0.0
    return inside & v


@triton.jit
def _tile_uniform(gbase, y0, y1, x0, x1, mw, crop_top, crop_left, crop_h, crop_w, th, tw, oy, ox,
                  ytab, xtab, MAXT: tl.constexpr, WR: tl.constexpr, WC: tl.constexpr,
                  SRC_BIN: tl.constexpr):
    """Is the canvas box [y0, y1) x [x0, x1) one value? Returns (uniform, value).

    Conservative: looks at the mask-grid window feeding the box; all > eps -> all 1,
    all <= 0 -> all 0 (weights are non-negative and sum to ~1), else "not uniform".
    """
    ty_lo = tl.maximum(y0 - oy, 0)
    ty_hi = tl.minimum(y1 - oy, th)
    tx_lo = tl.maximum(x0 - ox, 0)
    tx_hi = tl.minimum(x1 - ox, tw)
    outside_all = (ty_lo >= ty_hi) | (tx_lo >= tx_hi)
    partly_outside = (y0 - oy < 0) | (y1 - oy > th) | (x0 - ox < 0) | (x1 - ox > tw)
    uniform = outside_all
    value = outside_all.to(tl.int32) * 0
    if not SRC_BIN:
        if outside_all == 0:
            r_lo = tl.load(ytab + ty_lo * 4).to(tl.int32)
            r_hi = tl.minimum(tl.load(ytab + (ty_hi - 1) * 4).to(tl.int32) + (MAXT - 1), crop_h - 1)
            c_lo = tl.load(xtab + tx_lo * 4).to(tl.int32)
            c_hi = tl.minimum(tl.load(xtab + (tx_hi - 1) * 4).to(tl.int32) + (MAXT - 1), crop_w - 1)
            fits = (r_hi - r_lo < WR) & (c_hi - c_lo < WC)
            if fits:
                rr = r_lo + tl.arange(0, WR)[:, None]
                cc = c_lo + tl.arange(0, WC)[None, :]
                wm = (rr <= r_hi) & (cc <= c_hi)
                vals = tl.load(gbase + (crop_top + rr) * mw + crop_left + cc, mask=wm, other=0.0).to(tl.float32)
                has_nan = tl.max(((vals != vals) & wm).to(tl.int32)) > 0
                vmin = tl.min(tl.where(wm, vals, float("inf")))
                vmax = tl.max(tl.where(wm, vals, float("-inf")))
                # > 1e-30: no product can underflow to 0
                all_pos = (vmin > 1e-30) & (~partly_outside) & (~has_nan)
                all_off = (vmax <= 0.0) & (~has_nan)
                uniform = all_pos | all_off
                value = all_pos.to(tl.int32)
    return uniform, value


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _interp_float_kernel(grid_ptr, out_ptr, mw, crop_top, crop_left, crop_h, crop_w, th, tw,
                         ytab, xtab, MAXT: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Resized float logits of one grid (calibration / tests only)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < th * tw
    ty = tl.where(live, offs // tw, 0)
    tx = tl.where(live, offs % tw, 0)
    v = _interp_logits(grid_ptr, mw, crop_top, crop_left, crop_h, crop_w, ytab, xtab, ty, tx, MAXT, MODE)
    tl.store(out_ptr + offs, v, mask=live)


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


def window_size(block: int, in_size: int, out_size: int, max_taps: int) -> int:
    """Power-of-two grid window covering ``block`` consecutive output pixels."""
    span = int(math.ceil((block - 1) * in_size / max(out_size, 1))) + max_taps + 2
    return triton.next_power_of_2(max(span, 2))


def interp_logits_float(grid: torch.Tensor, crop_hw: Tuple[int, int], target_hw: Tuple[int, int],
                        mode: int) -> torch.Tensor:
    """Resized float logits of one (H, W) grid, top-left cropped to ``crop_hw``."""
    ch, cw = crop_hw
    th, tw = target_hw
    dev = grid.device
    ytab, ty = probe_axis_taps(ch, th, dev)
    xtab, tx = probe_axis_taps(cw, tw, dev)
    out = torch.empty((th, tw), dtype=torch.float32, device=dev)
    BLOCK = 1024
    _interp_float_kernel[(triton.cdiv(th * tw, BLOCK),)](
        grid.contiguous(), out, grid.shape[1], 0, 0, ch, cw, th, tw,
        torch.from_numpy(ytab).to(dev), torch.from_numpy(xtab).to(dev),
        MAXT=max(ty, tx), MODE=mode, BLOCK=BLOCK, enable_fp_fusion=False,
    )
    return out


# Near-exact bound: with no bit-exact recipe, a resized logit may differ from torch's by at
# most this fraction of the resize of |logits| at that pixel (two passes of at most 3 taps
# round at most 12 times between them, 12 * 2**-24 < 2**-20).
NEAR_EXACT_RELATIVE_BOUND = 2.0 ** -20


@dataclass(frozen=True)
class AccumulationRecipe:
    """How the mask kernels add their resize taps on one device.

    ``exact``: bit-identical to torch's resize on the calibration probes. Otherwise (a torch
    build that adds its taps in an order not recorded here) ``mode`` is the closest recipe and
    ``max_relative_error`` its worst ``|ours - torch| / resize(|logits|)``, at most
    :data:`NEAR_EXACT_RELATIVE_BOUND`: a mask pixel can then differ from torch's only where
    ``|logit| <= NEAR_EXACT_RELATIVE_BOUND * resize(|logits|)`` there. ``mode == -1``: no recipe
    is within the bound (a real disagreement; callers fall back).
    """

    mode: int
    exact: bool
    max_relative_error: float

    @property
    def usable(self) -> bool:
        return self.mode >= 0


_CALIBRATION: Dict[str, AccumulationRecipe] = {}
_PROBES = (((13, 11), (40, 29)), ((9, 16), (9, 51)), ((17, 7), (61, 7)), ((78, 78), (161, 203)))


def calibrate_accumulation(device: torch.device, seed: int = 1234) -> AccumulationRecipe:
    """The accumulation recipe that reproduces torch's resize on ``device`` (cached per device).

    Tries every recipe of ``ACC_MODES`` against ``torchvision``'s resize on random grids; the
    first bit-exact one wins, else the closest one within :data:`NEAR_EXACT_RELATIVE_BOUND`.

    Example:
        >>> recipe = calibrate_accumulation(torch.device("cuda"))
        >>> recipe.exact, recipe.mode  # doctest: +SKIP
        (True, 0)
    """
    key = str(device)
    if key not in _CALIBRATION:
        _CALIBRATION[key] = _calibrate(device, seed)
    return _CALIBRATION[key]


def _calibrate(device: torch.device, seed: int) -> AccumulationRecipe:
    gen = torch.Generator().manual_seed(seed)
    probes = []
    for (gh, gw), (th, tw) in _PROBES:
        grid = (torch.randn((gh, gw), generator=gen) * 4).to(device)
        ref = tvf.resize(grid[None], [th, tw], interpolation=tvf.InterpolationMode.BILINEAR)[0].float()
        magnitude = tvf.resize(grid.abs()[None], [th, tw], interpolation=tvf.InterpolationMode.BILINEAR)[0].float()
        probes.append((grid, (gh, gw), (th, tw), ref, magnitude))
    errors = {}
    for mode in ACC_MODES:
        worst = 0.0
        for grid, crop_hw, target_hw, ref, magnitude in probes:
            ours = interp_logits_float(grid, crop_hw, target_hw, mode)
            worst = max(worst, float(((ours - ref).abs() / magnitude.clamp_min(1e-30)).max()))
        if worst == 0.0:
            return AccumulationRecipe(mode, True, 0.0)
        errors[mode] = worst
    mode = min(errors, key=errors.get)
    if errors[mode] <= NEAR_EXACT_RELATIVE_BOUND:
        return AccumulationRecipe(mode, False, errors[mode])
    return AccumulationRecipe(-1, False, errors[mode])


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

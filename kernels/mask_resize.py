"""The exact mask resize of the fused postprocess: torch's resize taps, replayed in Triton.

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
* ``_eval_mask_pixels`` (a Triton device function shared by the dense and RLE kernels)
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
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import torch
import triton
import triton.language as tl
from torchvision.transforms import functional as tvf

from inference_fastpath.kernels.frame_geometry import FrameGeometry

# Accumulation recipes for ``acc = t0*w0; acc += t1*w1 (+ t2*w2)``.
ACC_FMA_SEQUENTIAL = 0  # acc = fma(t1, w1, round(t0*w0))       (x86 PyTorch, nvcc loop form)
ACC_FMA_FIRST = 1  # acc = fma(t0, w0, round(t1*w1))            (contraction of an unrolled sum)
ACC_NO_FMA = 2  # acc = round(round(t0*w0) + round(t1*w1))
ACC_MODES = (ACC_FMA_SEQUENTIAL, ACC_FMA_FIRST, ACC_NO_FMA)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
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

"""Fused, byte-exact image preprocess: uint8 HWC frame -> normalised NCHW network input.

One op, two Triton kernels:

* ``_pil_resample_normalize_kernel`` reproduces Pillow's antialiased ``BILINEAR`` resize of an
  8-bit RGB image (``Image.resize(size, Image.BILINEAR)``, ``src/libImaging/Resample.c``) and
  fuses the channel swap, the uint8 -> float normalisation and the write into a caller-owned
  (3, H, W) / (N, 3, H, W) view, fp32, fp16 or bf16. Pillow's arithmetic:

  - per axis, a triangle filter whose support grows with the downscale factor; weights are
    computed in double precision, normalised to sum to one, then rounded to int32 fixed point
    with ``PRECISION_BITS = 22`` (done here on the host and cached);
  - the horizontal pass runs first (except for very tall images, see
    :func:`pillow_resizes_vertically_first`) and its result is rounded and clipped to uint8 before
    the vertical pass; every pass starts its accumulator at ``1 << 21`` and shifts by 22;
  - Pillow skips a pass whose size is unchanged; the filter is then the identity (one tap of
    weight ``1 << 22``), so computing it anyway gives the same bytes.

  The kernel computes each output pixel directly from the source (the horizontal taps of every
  source row in the vertical window are recomputed per output row), so there is no scratch
  buffer and no second launch. Normalisation is a 3x256 lookup table computed on the host with
  the same torch float32 ops as the reference (then rounded once to the output dtype), which
  makes the output bit-identical: no device division or conversion whose rounding could differ.

* ``_cv2_linear_canvas_kernel`` reproduces ``cv2.resize(img, (w, h))`` (``INTER_LINEAR`` on
  uint8, OpenCV 4.x generic path: 11-bit fixed-point weights computed in float32, horizontal pass
  into int32, vertical pass ``(((h0 >> 4) * b0) >> 16) + (((h1 >> 4) * b1) >> 16) + 2) >> 2``) and
  places the result into a sub-rectangle of a uint8 canvas filled with a constant elsewhere. It
  serves the dataset-version resize that runs before the PIL stretch in letterbox /
  center-crop / fit-longer-edge modes.

Both kernels take arbitrary strides (HWC or CHW uint8 sources, crop views) and an optional batch
dimension (equally spaced frames of one size share a launch). Coefficient tables (``resize_coefficients.py``) are cached
per axis in a bounded LRU owned by a :class:`ResizeNormalizeOp` instance (no module-level mutable
state).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from inference_fastpath.kernels.resize_coefficients import (
    cv2_linear_axis,
    pil_bilinear_axis,
    pillow_resizes_vertically_first,
)

Box = Tuple[int, int, int, int]  # (x, y, width, height)
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _clip8(acc):
    # Pillow's clip8: (acc >> 22) clamped to [0, 255].
    return tl.minimum(tl.maximum(acc >> 22, 0), 255)


@triton.jit
def _tile_in_box(out_h, out_w, box_x, box_y, box_w, box_h, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    """Prologue shared by both kernels: the [BLOCK_Y, BLOCK_X] output tile of this program in
    image ``n`` and where it falls in the placement ``box`` of the output.

    Returns ``(n, gy, gx, in_out, inside, ry, rx)``: the image index (int64), the tile's output
    rows / columns, the mask of tile pixels inside the output, the mask of those inside ``box``,
    and the row / column relative to the box, clamped into it so that table and source loads
    stay in bounds (pixels outside the box are replaced by the pad value afterwards).
    """
    pid_x = tl.program_id(0)
    pid_y = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    gy = pid_y * BLOCK_Y + tl.arange(0, BLOCK_Y)
    gx = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    in_out = (gy < out_h)[:, None] & (gx < out_w)[None, :]
    ry = gy - box_y
    rx = gx - box_x
    inside = ((ry >= 0) & (ry < box_h))[:, None] & ((rx >= 0) & (rx < box_w))[None, :]
    ry = tl.minimum(tl.maximum(ry, 0), box_h - 1)
    rx = tl.minimum(tl.maximum(rx, 0), box_w - 1)
    return n, gy, gx, in_out, inside, ry, rx


# Sizes, strides and offsets change with every frame size: keep them out of the specialisation
# key so a new size (or a mixed-size batch) never triggers a recompile.
_PIL_DYNAMIC_ARGS = [
    "src_batch_stride", "src_stride_y", "src_stride_x", "src_stride_c", "src_h", "src_w",
    "out_batch_stride", "out_stride_c", "out_stride_y", "out_stride_x", "out_h", "out_w",
    "dbg_batch_stride", "dbg_stride_y", "dbg_stride_x",
    "taps_x", "taps_y", "box_x", "box_y", "box_w", "box_h", "pad_value",
]
_CV2_DYNAMIC_ARGS = [
    "src_batch_stride", "src_stride_y", "src_stride_x", "src_stride_c",
    "dst_batch_stride", "dst_stride_y", "dst_stride_x", "dst_stride_c", "dst_h", "dst_w",
    "box_x", "box_y", "box_w", "box_h", "pad_value",
]


@triton.jit(do_not_specialize=_PIL_DYNAMIC_ARGS)
def _pil_resample_normalize_kernel(
    src_ptr, src_batch_stride, src_stride_y, src_stride_x, src_stride_c, src_h, src_w,
    out_ptr, out_batch_stride, out_stride_c, out_stride_y, out_stride_x, out_h, out_w,
    dbg_ptr, dbg_batch_stride, dbg_stride_y, dbg_stride_x,
    lut_ptr,
    xtab_ptr, taps_x,
    ytab_ptr, taps_y,
    box_x, box_y, box_w, box_h, pad_value,
    SWAP_RB: tl.constexpr,
    VERTICAL_FIRST: tl.constexpr,
    WRITE_DEBUG: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    # Output tile [BLOCK_Y, BLOCK_X] of image `n`. The resized image occupies `box` of the
    # output; the rest gets `pad_value` (as a uint8 code, normalised through the LUT).
    # Table layout (int32): row 0 = window start per output index, rows 1.. = weights.
    n, gy, gx, in_out, inside, ry, rx = _tile_in_box(
        out_h, out_w, box_x, box_y, box_w, box_h, BLOCK_Y, BLOCK_X
    )
    ystart = tl.load(ytab_ptr + ry)
    xstart = tl.load(xtab_ptr + rx)
    src = src_ptr + n * src_batch_stride

    half = 1 << 21
    acc0 = tl.full([BLOCK_Y, BLOCK_X], half, tl.int32)
    acc1 = tl.full([BLOCK_Y, BLOCK_X], half, tl.int32)
    acc2 = tl.full([BLOCK_Y, BLOCK_X], half, tl.int32)
    if VERTICAL_FIRST:
        for j in range(0, taps_x):
            wx = tl.load(xtab_ptr + (j + 1) * box_w + rx)[None, :]
            col = tl.minimum(xstart + j, src_w - 1)[None, :] * src_stride_x
            t0 = tl.full([BLOCK_Y, BLOCK_X], half, tl.int32)
            t1 = tl.full([BLOCK_Y, BLOCK_X], half, tl.int32)
            t2 = tl.full([BLOCK_Y, BLOCK_X], half, tl.int32)
            for i in range(0, taps_y):
                wy = tl.load(ytab_ptr + (i + 1) * box_h + ry)[:, None]
                row = tl.minimum(ystart + i, src_h - 1)[:, None] * src_stride_y
                p = src + row + col
                t0 += tl.load(p).to(tl.int32) * wy
                t1 += tl.load(p + src_stride_c).to(tl.int32) * wy
                t2 += tl.load(p + 2 * src_stride_c).to(tl.int32) * wy
            acc0 += _clip8(t0) * wx
            acc1 += _clip8(t1) * wx
            acc2 += _clip8(t2) * wx
    else:
        for i in range(0, taps_y):
            wy = tl.load(ytab_ptr + (i + 1) * box_h + ry)[:, None]
            row = tl.minimum(ystart + i, src_h - 1)[:, None] * src_stride_y
            t0 = tl.full([BLOCK_Y, BLOCK_X], half, tl.int32)
            t1 = tl.full([BLOCK_Y, BLOCK_X], half, tl.int32)
            t2 = tl.full([BLOCK_Y, BLOCK_X], half, tl.int32)
            for j in range(0, taps_x):
                wx = tl.load(xtab_ptr + (j + 1) * box_w + rx)[None, :]
                col = tl.minimum(xstart + j, src_w - 1)[None, :] * src_stride_x
                p = src + row + col
                t0 += tl.load(p).to(tl.int32) * wx
                t1 += tl.load(p + src_stride_c).to(tl.int32) * wx
                t2 += tl.load(p + 2 * src_stride_c).to(tl.int32) * wx
            acc0 += _clip8(t0) * wy
            acc1 += _clip8(t1) * wy
            acc2 += _clip8(t2) * wy

    v0 = tl.where(inside, _clip8(acc0), pad_value)
    v1 = tl.where(inside, _clip8(acc1), pad_value)
    v2 = tl.where(inside, _clip8(acc2), pad_value)

    if WRITE_DEBUG:  # uint8 result in source channel order
        dbg = dbg_ptr + n * dbg_batch_stride + gy[:, None] * dbg_stride_y + gx[None, :] * dbg_stride_x
        tl.store(dbg, v0.to(tl.uint8), mask=in_out)
        tl.store(dbg + 1, v1.to(tl.uint8), mask=in_out)
        tl.store(dbg + 2, v2.to(tl.uint8), mask=in_out)

    if SWAP_RB:
        first = v2
        last = v0
    else:
        first = v0
        last = v2
    out = out_ptr + n * out_batch_stride + gy[:, None] * out_stride_y + gx[None, :] * out_stride_x
    out_ty = out_ptr.dtype.element_ty
    tl.store(out, tl.load(lut_ptr + first).to(out_ty), mask=in_out)
    tl.store(out + out_stride_c, tl.load(lut_ptr + 256 + v1).to(out_ty), mask=in_out)
    tl.store(out + 2 * out_stride_c, tl.load(lut_ptr + 512 + last).to(out_ty), mask=in_out)


@triton.jit(do_not_specialize=_CV2_DYNAMIC_ARGS)
def _cv2_linear_canvas_kernel(
    src_ptr, src_batch_stride, src_stride_y, src_stride_x, src_stride_c,
    dst_ptr, dst_batch_stride, dst_stride_y, dst_stride_x, dst_stride_c, dst_h, dst_w,
    xtab_ptr, ytab_ptr,
    box_x, box_y, box_w, box_h, pad_value,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    # Tables: int32 [4, box size] = index0, index1, weight0, weight1.
    n, gy, gx, in_dst, inside, ry, rx = _tile_in_box(
        dst_h, dst_w, box_x, box_y, box_w, box_h, BLOCK_Y, BLOCK_X
    )
    x0 = tl.load(xtab_ptr + rx)[None, :] * src_stride_x
    x1 = tl.load(xtab_ptr + box_w + rx)[None, :] * src_stride_x
    a0 = tl.load(xtab_ptr + 2 * box_w + rx)[None, :]
    a1 = tl.load(xtab_ptr + 3 * box_w + rx)[None, :]
    y0 = tl.load(ytab_ptr + ry)[:, None] * src_stride_y
    y1 = tl.load(ytab_ptr + box_h + ry)[:, None] * src_stride_y
    b0 = tl.load(ytab_ptr + 2 * box_h + ry)[:, None]
    b1 = tl.load(ytab_ptr + 3 * box_h + ry)[:, None]
    src = src_ptr + n * src_batch_stride
    dst = dst_ptr + n * dst_batch_stride + gy[:, None] * dst_stride_y + gx[None, :] * dst_stride_x
    for c in tl.static_range(3):
        p = src + c * src_stride_c
        h0 = tl.load(p + y0 + x0).to(tl.int32) * a0 + tl.load(p + y0 + x1).to(tl.int32) * a1
        h1 = tl.load(p + y1 + x0).to(tl.int32) * a0 + tl.load(p + y1 + x1).to(tl.int32) * a1
        # OpenCV's SIMD vertical pass: 16-bit mulhi of (h >> 4) by the weight, then (+2) >> 2.
        v = (((h0 >> 4) * b0) >> 16) + (((h1 >> 4) * b1) >> 16)
        v = tl.minimum(tl.maximum((v + 2) >> 2, 0), 255)
        v = tl.where(inside, v, pad_value)
        tl.store(dst + c * dst_stride_c, v.to(tl.uint8), mask=in_dst)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def interpreter_active() -> bool:
    """True when the kernels were built for ``TRITON_INTERPRET=1`` (CPU tensors)."""
    return type(_pil_resample_normalize_kernel).__name__ == "InterpretedFunction"


@dataclass
class _AxisTable:
    table: torch.Tensor  # int32 on the target device
    taps: int
    uploaded: Optional[torch.cuda.Event] = None  # CUDA: recorded after the async upload; None once done


def _as_batched_hwc(src: torch.Tensor) -> torch.Tensor:
    if src.dtype != torch.uint8:
        raise TypeError(f"source must be uint8, got {src.dtype}")
    if src.dim() == 3:
        src = src.unsqueeze(0)
    if src.dim() != 4 or src.shape[3] != 3:
        raise ValueError(f"source must be (H, W, 3) or (N, H, W, 3), got {tuple(src.shape)}")
    return src


def _crop_view(src: torch.Tensor, crop: Optional[Box]) -> torch.Tensor:
    if crop is None:
        return src
    x, y, w, h = crop
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > src.shape[2] or y + h > src.shape[1]:
        raise ValueError(f"crop {crop} outside a {src.shape[2]}x{src.shape[1]} frame")
    return src[:, y : y + h, x : x + w, :]


def _check_box(box: Optional[Box], width: int, height: int) -> Box:
    if box is None:
        return (0, 0, width, height)
    x, y, w, h = box
    if w < 1 or h < 1:
        raise ValueError(f"box {box} is empty")
    return box


class ResizeNormalizeOp:
    """Launcher for the fused preprocess kernels, with its own bounded LRU of coefficient tables.

    Thread-safe; instances share nothing. All launches go to the current CUDA stream (or run
    through the Triton interpreter for CPU tensors).
    """

    def __init__(
        self,
        device: torch.device,
        cache_size: int = 64,
        pil_block: Optional[Tuple[int, int]] = None,
        cv2_block: Optional[Tuple[int, int]] = None,
    ) -> None:
        """``pil_block`` / ``cv2_block``: output tile (rows, columns), powers of two; defaults
        suit a GPU, or the interpreter (where every program costs Python overhead: fewer,
        larger tiles)."""
        self.device = torch.device(device)
        self._cache_size = cache_size
        self._tables: "OrderedDict[Tuple, _AxisTable]" = OrderedDict()
        self._lock = threading.Lock()
        interpreted = interpreter_active()
        self._pil_block = pil_block or ((32, 32) if interpreted else (2, 64))
        self._cv2_block = cv2_block or ((32, 32) if interpreted else (8, 64))

    # -- coefficient tables ------------------------------------------------------------------

    def _upload(self, host: np.ndarray, taps: int) -> _AxisTable:
        tensor = torch.from_numpy(np.ascontiguousarray(host, dtype=np.int32))
        if self.device.type != "cuda":
            return _AxisTable(tensor.to(self.device), taps)
        # Pinned + async: no host sync; the caching host allocator keeps the pinned block alive
        # until the copy has run. Launches on other streams wait on `uploaded`.
        table = tensor.pin_memory().to(self.device, non_blocking=True)
        uploaded = torch.cuda.Event()
        uploaded.record()
        return _AxisTable(table, taps, uploaded)

    def _use(self, entry: _AxisTable, keep: Optional[List[torch.Tensor]]) -> torch.Tensor:
        """Make the current stream see the upload and keep the table alive for its launches
        even if the LRU drops it meanwhile. While a CUDA graph is being captured the upload
        must be complete, and the table goes into the caller's ``keep`` list (the graph's owner
        keeps it alive)."""
        if entry.uploaded is not None and entry.uploaded.query():
            entry.uploaded = None  # done: later launches need no wait
        if entry.uploaded is None and self.device.type != "cuda":
            return entry.table
        if torch.cuda.is_current_stream_capturing():
            if entry.uploaded is not None:
                raise RuntimeError("a coefficient table upload is still pending; capture later")
            if keep is not None:
                keep.append(entry.table)
            return entry.table
        stream = torch.cuda.current_stream(self.device)
        if entry.uploaded is not None:
            stream.wait_event(entry.uploaded)
        entry.table.record_stream(stream)
        return entry.table

    def _axis_table(self, kind: str, in_size: int, out_size: int) -> _AxisTable:
        key = (kind, in_size, out_size)
        with self._lock:
            hit = self._tables.get(key)
            if hit is not None:
                self._tables.move_to_end(key)
                return hit
        if kind == "pil":
            start, weights = pil_bilinear_axis(in_size, out_size)
            entry = self._upload(np.concatenate([start[None, :], weights]), int(weights.shape[0]))
        else:
            entry = self._upload(cv2_linear_axis(in_size, out_size, kind == "cv2x"), 2)
        with self._lock:
            self._tables[key] = entry
            self._tables.move_to_end(key)
            while len(self._tables) > self._cache_size:
                self._tables.popitem(last=False)
        return entry

    # -- ops ----------------------------------------------------------------------------------

    def resize_normalize(
        self,
        src: torch.Tensor,
        out: torch.Tensor,
        lut: torch.Tensor,
        *,
        crop: Optional[Box] = None,
        dst_box: Optional[Box] = None,
        pad_value: int = 0,
        swap_rb: bool = False,
        debug_u8: Optional[torch.Tensor] = None,
        keep: Optional[List[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """PIL-exact BILINEAR resize of ``src`` (optionally cropped) into ``dst_box`` of ``out``,
        then ``out[c] = lut[c, value]`` with the channel order reversed when ``swap_rb``.

        Args:
            src: uint8 ``(H, W, 3)`` or ``(N, H, W, 3)``, any strides (a CHW tensor permuted to
                HWC works as is).
            out: float32 / float16 ``(3, Ho, Wo)`` or ``(N, 3, Ho, Wo)`` view, any strides.
            lut: ``(3, 256)`` contiguous table on the device, indexed by output channel (see
                :func:`normalization_lut`). Give it in ``out``'s dtype: values are copied, not
                rounded on the device (the interpreter rounds fp32 -> bf16 differently).
            crop: ``(x, y, w, h)`` source region to resize (static crop); default whole frame.
            dst_box: ``(x, y, w, h)`` region of ``out`` receiving the resized image; the rest is
                ``lut[c, pad_value]`` (letterbox). Default: all of ``out``.
            keep: while a CUDA graph is captured, the coefficient tables the launch reads are
                appended here, for the graph's owner to keep alive.
            pad_value: uint8 code written outside ``dst_box``.
            swap_rb: reverse the channel order (BGR <-> RGB) on the way out.
            debug_u8: optional uint8 ``(Ho, Wo, 3)`` / ``(N, Ho, Wo, 3)`` receiving the resized
                bytes in *source* channel order (what ``PIL.Image.resize`` returns).

        Returns:
            ``out``.
        """
        src = _crop_view(_as_batched_hwc(src), crop)
        batched_out = out if out.dim() == 4 else out.unsqueeze(0)
        n, src_h, src_w = src.shape[0], src.shape[1], src.shape[2]
        if batched_out.shape[0] != n or batched_out.shape[1] != 3:
            raise ValueError(f"out {tuple(out.shape)} does not match source batch {n}")
        if out.dtype not in OUTPUT_DTYPES:
            raise TypeError(f"out must be float32, float16 or bfloat16, got {out.dtype}")
        if lut.shape != (3, 256) or lut.dtype not in OUTPUT_DTYPES or not lut.is_contiguous():
            raise ValueError("lut must be a contiguous floating (3, 256) tensor")
        if not 0 <= int(pad_value) <= 255:
            raise ValueError(f"pad_value must be a uint8 code, got {pad_value}")
        out_h, out_w = batched_out.shape[2], batched_out.shape[3]
        bx, by, bw, bh = _check_box(dst_box, out_w, out_h)
        vertical_first = pillow_resizes_vertically_first(src_w, src_h, bw, bh)
        xtab = self._axis_table("pil", src_w, bw)
        ytab = self._axis_table("pil", src_h, bh)

        if debug_u8 is not None:
            dbg = debug_u8 if debug_u8.dim() == 4 else debug_u8.unsqueeze(0)
            if tuple(dbg.shape) != (n, out_h, out_w, 3) or dbg.dtype != torch.uint8:
                raise ValueError(f"debug_u8 must be uint8 {(n, out_h, out_w, 3)}")
            if dbg.stride(3) != 1:
                raise ValueError("debug_u8 must have contiguous channels")
            dbg_strides = (dbg.stride(0), dbg.stride(1), dbg.stride(2))
        else:
            dbg, dbg_strides = src, (0, 0, 0)

        block_y, block_x = self._pil_block
        grid = (triton.cdiv(out_w, block_x), triton.cdiv(out_h, block_y), n)
        _pil_resample_normalize_kernel[grid](
            src, src.stride(0), src.stride(1), src.stride(2), src.stride(3), src_h, src_w,
            batched_out, batched_out.stride(0), batched_out.stride(1), batched_out.stride(2),
            batched_out.stride(3), out_h, out_w,
            dbg, *dbg_strides,
            lut,
            self._use(xtab, keep), xtab.taps,
            self._use(ytab, keep), ytab.taps,
            bx, by, bw, bh, int(pad_value),
            SWAP_RB=bool(swap_rb),
            VERTICAL_FIRST=vertical_first,
            WRITE_DEBUG=debug_u8 is not None,
            BLOCK_Y=block_y,
            BLOCK_X=block_x,
        )
        return out

    def linear_resize_into_canvas(
        self,
        src: torch.Tensor,
        canvas: torch.Tensor,
        *,
        crop: Optional[Box] = None,
        box: Optional[Box] = None,
        pad_value: int = 0,
        keep: Optional[List[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """``cv2.resize(src_crop, (box_w, box_h))`` (INTER_LINEAR, exact) written into ``box`` of
        the uint8 ``canvas`` (``(Hc, Wc, 3)`` or ``(N, Hc, Wc, 3)``); ``pad_value`` elsewhere.
        A box the size of the crop is a plain copy (crop + pad, as center-crop needs)."""
        src = _crop_view(_as_batched_hwc(src), crop)
        dst = _as_batched_hwc(canvas)
        n, src_h, src_w = src.shape[0], src.shape[1], src.shape[2]
        if dst.shape[0] != n:
            raise ValueError(f"canvas batch {dst.shape[0]} != source batch {n}")
        if not 0 <= int(pad_value) <= 255:
            raise ValueError(f"pad_value must be a uint8 code, got {pad_value}")
        dst_h, dst_w = dst.shape[1], dst.shape[2]
        bx, by, bw, bh = _check_box(box, dst_w, dst_h)
        xtab = self._axis_table("cv2x", src_w, bw)
        ytab = self._axis_table("cv2y", src_h, bh)
        block_y, block_x = self._cv2_block
        grid = (triton.cdiv(dst_w, block_x), triton.cdiv(dst_h, block_y), n)
        _cv2_linear_canvas_kernel[grid](
            src, src.stride(0), src.stride(1), src.stride(2), src.stride(3),
            dst, dst.stride(0), dst.stride(1), dst.stride(2), dst.stride(3), dst_h, dst_w,
            self._use(xtab, keep), self._use(ytab, keep),
            bx, by, bw, bh, int(pad_value),
            BLOCK_Y=block_y,
            BLOCK_X=block_x,
        )
        return canvas


__all__ = ["Box", "OUTPUT_DTYPES", "ResizeNormalizeOp", "interpreter_active"]

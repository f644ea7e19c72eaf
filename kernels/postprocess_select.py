"""Fused detection selection for RF-DETR instance segmentation.

Reproduces the selection half of inference-models'
``post_process_instance_segmentation_results`` (and its RLE twin): flat top-k over
``queries x classes`` with ``k = queries``, class remapping or dropping of ids
``>= num_classes``, strict ``score > threshold`` (scalar or per class), descending
sort, ``max_detections`` cap and the box decode onto the final mask canvas
(``_align_boxes_to_mask_grid`` + ``finalize_instance_segmentation_boxes``).

Everything for a batch lands in ONE int32 tensor (``SelectionBuffer.packed``) so the
host needs a single device->host copy; see :func:`decode_selection`.

Ordering of exact score ties (what the reference gives):

* ``torch.topk`` on CUDA (``k > 32``) returns ties in ascending flat index order
  (its gather writes strictly-greater elements, then equal ones, in index order and
  the final in-place sort is stable for ``k > 32``). We rank candidates by
  ``(score desc, flat index asc)``, which is that order, including which of several
  tied elements make it into the top ``k``.
* The later ``torch.sort(descending=True)`` is stable on CUDA for ``n > 32`` but for
  ``2 <= n <= 32`` runs PyTorch's 32-wide bitonic network, which permutes ties. We run
  the same network (``_bitonic32_perm``), so ties come out in the reference order,
  including which ties survive ``max_detections``.
* On the CPU, torch's top-k / sort tie order comes from ``std::partial_sort`` /
  ``nth_element`` and is not reproduced: with exact ties the CPU reference may list
  tied detections in another order (the set of kept detections can differ only when
  a tie straddles the ``k`` boundary or the cap). Results without exact ties are
  identical everywhere.
* ``queries <= 32`` (topk itself would use the bitonic sort) is not supported; the
  stage reports it through ``unsupported_reason``.

Why torch for the sigmoid: the reference scores are ``torch.sigmoid`` outputs (Sleef
``exp`` on CPU, libdevice ``expf`` on CUDA). Computing them with torch keeps every
score bit-identical to the reference on any device for one elementwise launch; the
rest (ranking, filtering, sorting, cap, box decode) is one Triton kernel per batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import triton
import triton.language as tl

from inference_fastpath.kernels.frame_geometry import FrameGeometry, geometry_params

# Row layout of the packed selection output (int32 words per detection).
ROW_WORDS = 8
COL_SCORE, COL_CLASS, COL_QUERY, COL_X1, COL_Y1, COL_X2, COL_Y2, COL_FLAT = range(8)
# Header words per image, before the rows: [n_written, n_passing_topk, pad...].
HEADER_WORDS = 8
_NO_RANK = tl.constexpr(2**31 - 1)  # kernels may only read constexpr globals
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _order_key(s):
    """Monotone int32 key of a float32 score; NaN ranks highest like torch.topk."""
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return tl.where(s != s, 0x7FFFFFFF, key)


@triton.jit
def _rank_kernel(
    scores_ptr,
    thr_ptr,
    map_ptr,
    rank_ptr,
    QC,
    C,
    Q,
    num_classes,
    map_len,
    thr_scalar,
    HAS_MAP: tl.constexpr,
    PER_CLASS: tl.constexpr,
    CB: tl.constexpr,
    EB: tl.constexpr,
):
    """For every (query, class) element passing class + threshold filters, its rank in
    the flat ordering (score desc, flat index asc); _NO_RANK otherwise or if rank >= Q."""
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * CB + tl.arange(0, CB)
    in_range = offs < QC
    base = scores_ptr + b.to(tl.int64) * QC
    s = tl.load(base + offs, mask=in_range, other=0.0)
    cls = offs % C
    if HAS_MAP:
        mapped = tl.load(map_ptr + cls, mask=in_range & (cls < map_len), other=-1)
    else:
        mapped = tl.where(cls < num_classes, cls, -1)
    named = in_range & (mapped >= 0)
    if PER_CLASS:
        thr = tl.load(thr_ptr + tl.maximum(mapped, 0), mask=named, other=0.0)
    else:
        thr = thr_scalar
    passing = named & (s > thr)
    n_pass = tl.sum(passing.to(tl.int32), axis=0)
    rank = tl.zeros([CB], dtype=tl.int32)
    if n_pass > 0:
        key = _order_key(s)
        for start in range(0, QC, EB):
            eo = start + tl.arange(0, EB)
            em = eo < QC
            ek = _order_key(tl.load(base + eo, mask=em, other=0.0))
            before = (ek[None, :] > key[:, None]) | (
                (ek[None, :] == key[:, None]) & (eo[None, :] < offs[:, None])
            )
            rank += tl.sum((before & em[None, :]).to(tl.int32), axis=1)
    out = tl.where(passing & (rank < Q), rank, _NO_RANK)
    tl.store(rank_ptr + b.to(tl.int64) * QC + offs, out, mask=in_range)


@triton.jit
def _partner(x, s: tl.constexpr, P: tl.constexpr):
    """x[i ^ s] for a length-P vector (one-hot reduction: exact for any value)."""
    rows = tl.arange(0, P)[:, None]
    cols = tl.arange(0, P)[None, :]
    pick = cols == (rows ^ s)
    return tl.sum(tl.where(pick, x[None, :], tl.zeros_like(x)[None, :]), axis=1)


@triton.jit
def _bitonic_step(key, val, valid, pos, s: tl.constexpr, size: tl.constexpr, FINAL: tl.constexpr):
    """One compare-exchange layer of PyTorch's bitonicSortKVInPlace (descending, GTOp)."""
    pk = _partner(key, s, 32)
    pv = _partner(val, s, 32)
    pvalid = _partner(valid, s, 32)
    is_a = (pos & s) == 0
    ka = tl.where(is_a, key, pk)
    kb = tl.where(is_a, pk, key)
    va_ok = tl.where(is_a, valid, pvalid) != 0
    vb_ok = tl.where(is_a, pvalid, valid) != 0
    swap = ((ka > kb) & va_ok) | (~vb_ok)
    if FINAL:
        direction = tl.zeros([32], dtype=tl.int1)
    else:
        direction = (pos & size) != 0
    exchange = swap == direction
    key = tl.where(exchange, pk, key)
    val = tl.where(exchange, pv, val)
    valid = tl.where(exchange, pvalid, valid)
    return key, val, valid


@triton.jit
def _bitonic32_perm(key, n):
    """Positions 0..31 after PyTorch's small (n <= 32) unstable CUDA sort of ``key``.

    Returns, for each output slot i, the input slot it came from.
    """
    pos = tl.arange(0, 32)
    valid = (pos < n).to(tl.int32)
    val = pos
    for size_log in tl.static_range(1, 5):
        for stride_log in tl.static_range(size_log - 1, -1, -1):
            key, val, valid = _bitonic_step(
                key, val, valid, pos, 1 << stride_log, 1 << size_log, False
            )
    for stride_log in tl.static_range(4, -1, -1):
        key, val, valid = _bitonic_step(key, val, valid, pos, 1 << stride_log, 32, True)
    return val


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f  # exact for the non-negative, clamped coordinates used here
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _box_coord(center, size, denorm, pad, scale, offset, limit, rounding):
    # Same op sequence and float32 rounding steps as the reference (fp fusion is off):
    # (c - 0.5*s) * denorm, - pad, / scale, + offset, clamp, optional round-half-even.
    v = (center + size) * denorm
    v = v - pad
    v = tl.div_rn(v, scale)
    v = v + offset
    v = tl.minimum(tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL), limit, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(rounding, _round_half_even(v), v)


@triton.jit
def _finalize_kernel(
    scores_ptr,
    boxes_ptr,
    rank_ptr,
    map_ptr,
    params_ptr,
    slots_ptr,
    out_ptr,
    QC,
    C,
    Q,
    cap,
    out_words,
    HAS_MAP: tl.constexpr,
    QP: tl.constexpr,
    EB: tl.constexpr,
):
    """Per image: collect ranked survivors in rank order, apply the reference's small-n
    tie permutation, cap, decode boxes and write header + rows."""
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    slot_base = slots_ptr + b64 * QP
    qoffs = tl.arange(0, QP)
    tl.store(slot_base + qoffs, tl.full([QP], -1, tl.int32))
    tl.debug_barrier()
    for start in range(0, QC, EB):
        eo = start + tl.arange(0, EB)
        r = tl.load(rank_ptr + b64 * QC + eo, mask=eo < QC, other=_NO_RANK)
        keep = r < Q
        tl.store(slot_base + tl.where(keep, r, 0), eo, mask=keep)
    tl.debug_barrier()
    flat = tl.load(slot_base + qoffs)
    present = flat >= 0
    n = tl.sum(present.to(tl.int32), axis=0)
    # compact present slots (ranks are unique) into sorted order
    dest = tl.cumsum(present.to(tl.int32), axis=0) - 1
    tl.debug_barrier()
    tl.store(slot_base + tl.where(present, dest, 0), flat, mask=present)
    tl.debug_barrier()
    # small-n tie permutation (bitonic), only the first 32 entries can move
    lane = tl.arange(0, 32)
    first = tl.load(slot_base + lane, mask=lane < n, other=0)
    first_scores = tl.load(scores_ptr + b64 * QC + first, mask=lane < n, other=0.0)
    perm = lane
    if (n >= 2) & (n <= 32):
        perm = _bitonic32_perm(first_scores, n)
    tl.debug_barrier()
    permuted = tl.load(slot_base + perm, mask=lane < n, other=0)
    tl.debug_barrier()
    tl.store(slot_base + lane, permuted, mask=lane < n)
    tl.debug_barrier()
    sorted_flat = tl.load(slot_base + qoffs, mask=qoffs < n, other=0)

    n_out = tl.minimum(n, cap)
    live = qoffs < n_out
    score = tl.load(scores_ptr + b64 * QC + sorted_flat, mask=live, other=0.0)
    query = sorted_flat // C
    cls = sorted_flat % C
    if HAS_MAP:
        cls = tl.load(map_ptr + cls, mask=live, other=0)
    bbase = boxes_ptr + (b64 * Q + query) * 4
    cx = tl.load(bbase + 0, mask=live, other=0.0)
    cy = tl.load(bbase + 1, mask=live, other=0.0)
    w = tl.load(bbase + 2, mask=live, other=0.0)
    h = tl.load(bbase + 3, mask=live, other=0.0)
    p = params_ptr + b64 * 12
    dw = tl.load(p + 0)
    dh = tl.load(p + 1)
    pad_l = tl.load(p + 2)
    pad_t = tl.load(p + 3)
    sw = tl.load(p + 4)
    sh = tl.load(p + 5)
    ox = tl.load(p + 6)
    oy = tl.load(p + 7)
    cw = tl.load(p + 8)
    ch = tl.load(p + 9)
    rounding = tl.load(p + 10) != 0.0
    hw = -0.5 * w
    hh = -0.5 * h
    x1 = _box_coord(cx, hw, dw, pad_l, sw, ox, cw, rounding)
    y1 = _box_coord(cy, hh, dh, pad_t, sh, oy, ch, rounding)
    x2 = _box_coord(cx, -hw, dw, pad_l, sw, ox, cw, rounding)
    y2 = _box_coord(cy, -hh, dh, pad_t, sh, oy, ch, rounding)

    obase = out_ptr + b64 * out_words
    tl.store(obase + 0, n_out)
    tl.store(obase + 1, n)
    rows = obase + 8 + qoffs * 8
    tl.store(rows + 0, score.to(tl.int32, bitcast=True), mask=live)
    tl.store(rows + 1, cls.to(tl.int32), mask=live)
    tl.store(rows + 2, query.to(tl.int32), mask=live)
    tl.store(rows + 3, x1.to(tl.int32, bitcast=True), mask=live)
    tl.store(rows + 4, y1.to(tl.int32, bitcast=True), mask=live)
    tl.store(rows + 5, x2.to(tl.int32, bitcast=True), mask=live)
    tl.store(rows + 6, y2.to(tl.int32, bitcast=True), mask=live)
    tl.store(rows + 7, sorted_flat.to(tl.int32), mask=live)


# ----------------------------------------------------------------------------- host API


@dataclass
class SelectionBuffer:
    """Device result of :func:`select_detections` for a batch.

    ``packed`` is (B, HEADER_WORDS + capacity * ROW_WORDS) int32: per image a header
    ``[n_out, n_kept_before_cap, 0...]`` then ``capacity`` rows of
    ``[score_f32_bits, class_id, query, x1, y1, x2, y2 (f32 bits), flat_index]``.
    """

    packed: torch.Tensor
    capacity: int

    @property
    def words_per_image(self) -> int:
        return int(self.packed.shape[1])

    def n_out_device(self) -> torch.Tensor:
        return self.packed[:, 0]

    def queries_device(self) -> torch.Tensor:
        """(B, capacity) int32 query index of each output row (junk past n_out)."""
        rows = self.packed[:, HEADER_WORDS:].view(-1, self.capacity, ROW_WORDS)
        return rows[:, :, COL_QUERY]


@dataclass
class FrameSelection:
    """Host view of one image's selection."""

    confidence: np.ndarray  # (N,) float32
    class_id: np.ndarray  # (N,) int64
    query: np.ndarray  # (N,) int64
    xyxy: np.ndarray  # (N, 4) float32
    n_before_cap: int


def decode_selection(host_packed: np.ndarray, capacity: int) -> List[FrameSelection]:
    """Turn the host copy of ``SelectionBuffer.packed`` into per-image arrays."""
    host_packed = np.asarray(host_packed, dtype=np.int32)
    frames = []
    for row in host_packed:
        n = int(row[0])
        body = row[HEADER_WORDS : HEADER_WORDS + capacity * ROW_WORDS].reshape(capacity, ROW_WORDS)[:n]
        floats = body.view(np.float32)
        frames.append(
            FrameSelection(
                confidence=floats[:, COL_SCORE].copy(),
                class_id=body[:, COL_CLASS].astype(np.int64),
                query=body[:, COL_QUERY].astype(np.int64),
                xyxy=np.ascontiguousarray(floats[:, COL_X1 : COL_Y2 + 1]),
                n_before_cap=int(row[1]),
            )
        )
    return frames


def selection_capacity(num_queries: int, max_detections: Optional[int]) -> int:
    cap = num_queries if max_detections is None else max(0, min(num_queries, int(max_detections)))
    return max(cap, 1)


def select_detections(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    geometries: Sequence[FrameGeometry],
    threshold: Union[float, torch.Tensor],
    num_classes: int,
    class_mapping: Optional[torch.Tensor],
    max_detections: Optional[int],
    params: Optional[torch.Tensor] = None,
) -> SelectionBuffer:
    """Run sigmoid + fused selection for a batch. Nothing is synchronised.

    Args:
        logits: (B, Q, C) float32 class logits.
        boxes: (B, Q, 4) float32 cxcywh boxes, normalised to the network input.
        geometries: one :class:`FrameGeometry` per image.
        threshold: python float or per-class float tensor indexed by (mapped) class id.
        num_classes: ids ``>= num_classes`` are dropped when ``class_mapping`` is None.
        class_mapping: ``ClassesReMapping.class_mapping`` (-1 = removed) or None.
        max_detections: cap applied after the sort (None = no cap).
        params: optional pre-uploaded ``geometry_params`` tensor (saves an H2D copy).
    """
    B, Q, C = logits.shape
    device = logits.device
    QC = Q * C
    scores = torch.sigmoid(logits).contiguous()
    boxes = boxes.contiguous()
    capacity = selection_capacity(Q, max_detections)
    cap_value = Q if max_detections is None else max(0, int(max_detections))
    QP = triton.next_power_of_2(max(Q, 32))
    per_class = isinstance(threshold, torch.Tensor)
    if per_class:
        thr_tensor = threshold.to(device=device, dtype=torch.float32).contiguous()
        thr_scalar = 0.0
    else:
        thr_tensor = scores  # unused placeholder pointer
        thr_scalar = float(np.float32(threshold))  # the reference compares in float32
    has_map = class_mapping is not None
    if has_map:
        map_tensor = class_mapping.to(device=device, dtype=torch.int32).contiguous()
        map_len = int(map_tensor.numel())
    else:
        map_tensor = torch.zeros(1, dtype=torch.int32, device=device)
        map_len = 0
    if params is None:
        params = torch.from_numpy(geometry_params(geometries)).to(device)
    ranks = torch.empty((B, QC), dtype=torch.int32, device=device)
    # the interpreter (CPU tests) pays per program and per op, the GPU per element
    CB, EB = (256, 2048) if _INTERPRET else (32, 256)
    _rank_kernel[(B, triton.cdiv(QC, CB))](
        scores,
        thr_tensor,
        map_tensor,
        ranks,
        QC,
        C,
        Q,
        int(num_classes),
        map_len,
        thr_scalar,
        HAS_MAP=has_map,
        PER_CLASS=per_class,
        CB=CB,
        EB=EB,
        enable_fp_fusion=False,
    )
    words = HEADER_WORDS + capacity * ROW_WORDS
    packed = torch.zeros((B, words), dtype=torch.int32, device=device)
    slots = torch.empty((B, QP), dtype=torch.int32, device=device)
    _finalize_kernel[(B,)](
        scores,
        boxes,
        ranks,
        map_tensor,
        params,
        slots,
        packed,
        QC,
        C,
        Q,
        min(cap_value, capacity),
        words,
        HAS_MAP=has_map,
        QP=QP,
        EB=EB,
        enable_fp_fusion=False,
        num_warps=4,
    )
    return SelectionBuffer(packed=packed, capacity=capacity)

"""COCO compressed RLE strings on the device, from the masks' transition positions.

A compressed COCO RLE (pycocotools ``rleToString``) writes each run count ``c_i`` - minus
``c_{i-2}`` from the fourth count on - as 5-bit groups, least significant first, each group
``+ 48`` and ``| 0x20`` while more groups follow; a value stops when the rest is its sign
extension (a signed value in ``5 * L`` bits takes ``L`` groups). The run counts of a mask are
the differences of ``[0, t_0, ..., t_{k-1}, H * W]`` where ``t`` are its transition positions in
column-major order (``postprocess_mask_rle.py`` produces them).

Two passes, one program per mask row, so they sit in the postprocess CUDA graph with fixed
grids: pass 1 sums each row's string length, a cumsum gives the rows' starts, pass 2 writes the
bytes. The host then only slices ``bytes`` out of the copied payload: no run-length coding on the
CPU. Bytes past ``out_limit`` are not written; the row lengths stay exact, so the caller sees
the total and sizes up.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
STRING_BLOCK = 4096 if _INTERPRET else 1024
MAX_GROUPS = 7  # 35 bits: any difference of int32 positions


@triton.jit
def _boundary(pos_ptr, start, j, k, n_pixels):
    """Position ``j`` of ``[t_0, ..., t_{k-1}]`` extended by ``t_{-1} = 0`` and ``t_k = H * W``."""
    inside = (j >= 0) & (j < k)
    value = tl.load(pos_ptr + start + j, mask=inside, other=0).to(tl.int64)
    return tl.where(j == k, n_pixels, value)


@triton.jit
def _rle_string_kernel(
    pos_ptr, row_start_ptr, row_slots_ptr, row_pixels_ptr, row_bytes_ptr, row_offset_ptr, out_ptr,
    out_limit, WRITE: tl.constexpr, BLOCK: tl.constexpr, GROUPS: tl.constexpr,
):
    """Pass 1 (WRITE=False): row_bytes[r] = string length of row r.
    Pass 2 (WRITE=True): the string of row r from out[row_offset[r]]."""
    r = tl.program_id(0)
    slots = tl.load(row_slots_ptr + r)  # run counts of the row (transitions + 1), 0: no mask
    start = tl.load(row_start_ptr + r)
    n_pixels = tl.load(row_pixels_ptr + r).to(tl.int64)
    k = slots - 1
    running = tl.zeros([1], dtype=tl.int64)
    if WRITE:
        running += tl.load(row_offset_ptr + r)
    total = tl.zeros([1], dtype=tl.int64)
    lanes = tl.arange(0, BLOCK)
    for j0 in range(0, slots, BLOCK):
        j = (j0 + lanes).to(tl.int64)
        valid = j < slots
        value = _boundary(pos_ptr, start, j, k, n_pixels) - _boundary(pos_ptr, start, j - 1, k, n_pixels)
        older = _boundary(pos_ptr, start, j - 2, k, n_pixels) - _boundary(pos_ptr, start, j - 3, k, n_pixels)
        value = tl.where(j > 2, value - older, value)
        groups = tl.full([BLOCK], 1, dtype=tl.int32)
        for g in tl.static_range(1, GROUPS):
            half = 1 << (5 * g - 1)  # g groups hold [-half, half)
            groups = tl.where((value < -half) | (value >= half), g + 1, groups)
        groups = tl.where(valid, groups, 0)
        if WRITE:
            at = running + (tl.cumsum(groups, axis=0) - groups).to(tl.int64)
            for g in tl.static_range(0, GROUPS):
                byte = ((value >> (5 * g)) & 31) + tl.where(g + 1 < groups, 32, 0) + 48
                tl.store(out_ptr + at + g, byte.to(tl.uint8), mask=(g < groups) & (at + g < out_limit))
        block_sum = tl.sum(groups.to(tl.int64), axis=0)
        running += block_sum
        total += block_sum
    if not WRITE:
        tl.store(row_bytes_ptr + r + tl.arange(0, 1), total)


def launch_rle_strings(
    positions: torch.Tensor,
    row_start: torch.Tensor,
    row_slots: torch.Tensor,
    row_pixels: torch.Tensor,
    out: torch.Tensor,
    row_bytes: torch.Tensor,
) -> torch.Tensor:
    """Write the compressed COCO string of every row into ``out`` (uint8), back to back in row
    order; returns the rows' int64 start offsets. ``positions`` int32 transitions; per row:
    ``row_start`` (int64, its first transition in ``positions``), ``row_slots`` (int32, its
    transitions + 1, or 0 for a row without a mask), ``row_pixels`` (int64, H * W).
    ``row_bytes`` (int64, one per row) receives the lengths. No host read: graph-capturable."""
    rows = row_slots.numel()
    common = dict(BLOCK=STRING_BLOCK, GROUPS=MAX_GROUPS)
    _rle_string_kernel[(rows,)](positions, row_start, row_slots, row_pixels, row_bytes, row_bytes, out,
                                out.numel(), WRITE=False, **common)
    offsets = torch.cumsum(row_bytes, 0) - row_bytes
    _rle_string_kernel[(rows,)](positions, row_start, row_slots, row_pixels, row_bytes, offsets, out,
                                out.numel(), WRITE=True, **common)
    return offsets


__all__ = ["MAX_GROUPS", "launch_rle_strings"]

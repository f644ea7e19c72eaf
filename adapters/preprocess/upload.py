"""Uploads of numpy frames for the Triton preprocess: pinned staging slots and row-chunked async copies.

Numpy frames are copied into a reusable pinned staging buffer (two slots, so filling one never waits on
the copy of the previous call) and sent by async copies on the stage's stream; large batches go in row
chunks, each sent as soon as it is filled, so the DMA of one chunk overlaps the fill of the next
(:func:`plan_upload_chunks`). Frames already in pinned memory are sent straight from the frame.
"""

from __future__ import annotations

import bisect
import os
import weakref
from inference_fastpath.adapters.caches import LRUCache
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from inference_fastpath.adapters.cuda.pinned_frames import is_pinned_frame

_LAYOUT_CACHE_SIZE = 64  # staging layouts kept per batch shape
_STAGING_ALIGN = 16  # keeps every staged frame 16-byte aligned (Triton specialises on it)


# Chunked upload policy. A numpy frame is filled into pinned memory and sent with an H2D DMA.
# Split into row chunks, chunk k's DMA can run while chunk k+1 is filled, leaving about
# (fill + DMA) / n exposed on top of max(fill, DMA); but each extra chunk costs one more copy_ call
# (host time) and a DMA start-up, which outweighs the overlap below 4K-sized batches
# (`examples/benchmarks/bench_preprocess.py --sweep-upload` measures it). So only batches of at least
# _CHUNKING_MIN_BYTES are chunked: n = round(bytes / _CHUNK_TARGET_BYTES), between 2 and
# _MAX_UPLOAD_CHUNKS. Chunk boundaries fall on row boundaries (whole rows of one or more frames).
_CHUNKING_MIN_BYTES = 16 << 20
_CHUNK_TARGET_BYTES = 3 << 19  # 1.5 MiB
_MAX_UPLOAD_CHUNKS = 8


def auto_upload_chunks(total_bytes: int) -> int:
    """Number of row chunks for an upload of ``total_bytes`` (see the policy above)."""
    if total_bytes < _CHUNKING_MIN_BYTES:
        return 1
    return max(2, min(_MAX_UPLOAD_CHUNKS, round(total_bytes / _CHUNK_TARGET_BYTES)))


def auto_fill_threads() -> int:
    """Worker threads filling the chunks of a chunked upload: two when the host has the cores for them.

    The fills never go through torch's CPU copy: it runs on torch's intra-op pool (OpenMP), and inside
    ``InferencePipeline``, which calls the step from several pool threads in turn, that copy slowed the
    fill and the whole run (results README, 2026-12-07 third session)."""
    return 2 if (os.cpu_count() or 1) >= 4 else 0


def staging_layout(frames: Sequence[np.ndarray]) -> Tuple[List[int], int]:
    """Byte offset of every frame in the staging buffer (16-byte aligned) and the total size."""
    offsets, total = [], 0
    for frame in frames:
        offsets.append(total)
        total += -(-frame.nbytes // _STAGING_ALIGN) * _STAGING_ALIGN
    return offsets, total


@dataclass(frozen=True)
class UploadChunk:
    """Bytes ``[start, end)`` of the staging buffer, sent by one H2D copy once ``pieces`` --
    ``(frame index, first row, end row)`` -- are filled. ``start`` / ``end`` sit on row
    boundaries; the bytes between two frames are alignment padding (copied, never read)."""

    start: int
    end: int
    pieces: Tuple[Tuple[int, int, int], ...]


def plan_upload_chunks(
    heights: Sequence[int], row_bytes: Sequence[int], offsets: Sequence[int], chunks: int
) -> List[UploadChunk]:
    """Split the staged frames (``heights[i]`` rows of ``row_bytes[i]`` bytes at ``offsets[i]``)
    into at most ``chunks`` consecutive chunks of whole rows, as even in bytes as rows allow.

    The chunks tile ``[offsets[0], end of the last frame)`` in order; every row of every frame
    is in exactly one piece. Fewer chunks come back when there are not enough rows.
    """
    count = len(heights)
    if count == 0:
        return []
    if not (len(row_bytes) == len(offsets) == count):
        raise ValueError("heights, row_bytes and offsets differ in length")
    chunks = max(1, int(chunks))

    def position(frame: int, row: int) -> int:
        return offsets[frame] + row * row_bytes[frame] if frame < count else end

    def boundary(target: float) -> Tuple[int, int]:
        # The row boundary nearest to byte `target`, as (frame, row) with row < its height
        # (a frame's end is written as the next frame's row 0).
        frame = max(bisect.bisect_right(offsets, target) - 1, 0)
        row = int(round((target - offsets[frame]) / row_bytes[frame]))
        row = min(max(row, 0), heights[frame])
        return (frame + 1, 0) if row == heights[frame] else (frame, row)

    begin = offsets[0]
    end = offsets[-1] + heights[-1] * row_bytes[-1]
    cuts = [(0, 0)]
    for k in range(1, chunks):
        cut = boundary(begin + (end - begin) * k / chunks)
        if cut > cuts[-1] and cut < (count, 0):
            cuts.append(cut)
    cuts.append((count, 0))

    plan = []
    for (f0, r0), (f1, r1) in zip(cuts, cuts[1:]):
        pieces = []
        for frame in range(f0, min(f1, count - 1) + 1):
            first = r0 if frame == f0 else 0
            last = r1 if frame == f1 else heights[frame]
            if last > first:
                pieces.append((frame, first, last))
        plan.append(UploadChunk(position(f0, r0), position(f1, r1), tuple(pieces)))
    return plan


def _frame_rows(host: torch.Tensor, frame: np.ndarray, offset: int, first: int, last: int) -> torch.Tensor:
    row = frame.shape[1] * frame.shape[2]
    return host[offset + first * row : offset + last * row].view(last - first, *frame.shape[1:])


def fill_chunk(
    host: torch.Tensor,
    frames: Sequence[np.ndarray],
    offsets: Sequence[int],
    chunk: UploadChunk,
) -> None:
    """Copy the rows of ``chunk`` from ``frames`` into the uint8 staging tensor ``host``, by
    ``np.copyto`` (one thread, the GIL released; any strides, negative included)."""
    for index, first, last in chunk.pieces:
        frame = frames[index]
        np.copyto(_frame_rows(host, frame, offsets[index], first, last).numpy(), frame[first:last])


def fill_chunks(
    host: torch.Tensor,
    frames: Sequence[np.ndarray],
    offsets: Sequence[int],
    chunks: Sequence[UploadChunk],
    send: Optional[Callable[[UploadChunk], None]] = None,
    pool: Optional[ThreadPoolExecutor] = None,
) -> None:
    """Fill ``chunks`` in order and call ``send(chunk)`` as soon as each one is complete (the
    H2D enqueue), so the copy of chunk k overlaps the fill of the chunks after it.

    With ``pool`` the fills run on its workers while this thread sends completed chunks in order.
    Returns only when no fill is running."""
    if pool is None or len(chunks) < 2:
        for chunk in chunks:
            fill_chunk(host, frames, offsets, chunk)
            if send is not None:
                send(chunk)
        return
    futures = [pool.submit(fill_chunk, host, frames, offsets, c) for c in chunks]
    try:
        for chunk, future in zip(chunks, futures):
            future.result()
            if send is not None:
                send(chunk)
    finally:
        for future in futures:  # never leave a worker writing into the slot (error path)
            future.cancel()
        wait(futures)


class Staging:
    """Host staging for numpy frames: two pinned slots (CUDA) plus one device buffer.

    CUDA: the frames are filled into the slot in row chunks and each chunk's async H2D copy is
    enqueued on the upload stream as soon as it is filled (see ``auto_upload_chunks``); the
    slot's event, recorded after the last copy, is waited on before the slot is filled again
    two calls later. On CPU the host slot is used directly as the kernel source.

    ``chunks``: number of row chunks per upload (``None``: by size, ``1``: one copy).
    ``threads``: fill workers (``None``: :func:`auto_fill_threads`, ``0``: the calling thread).
    """

    def __init__(
        self, device: torch.device, chunks: Optional[int] = None, threads: Optional[int] = None
    ) -> None:
        if chunks is not None and int(chunks) < 1:
            raise ValueError(f"chunks must be >= 1 or None, got {chunks}")
        if threads is not None and int(threads) < 0:
            raise ValueError(f"threads must be >= 0 or None, got {threads}")
        self._device = device
        self._cuda = device.type == "cuda"
        self.chunks = None if chunks is None else int(chunks)
        self.threads = auto_fill_threads() if threads is None else int(threads)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._plans: LRUCache[Tuple, Tuple[List[int], int, List[UploadChunk]]] = LRUCache(_LAYOUT_CACHE_SIZE)
        self._host: List[Optional[torch.Tensor]] = [None, None]
        self._copied: List[Optional[torch.cuda.Event]] = [None, None]  # one reusable event a slot
        self._pending = [False, False]  # the slot's event marks copies not yet waited for
        self._held: List[Optional[List[np.ndarray]]] = [None, None]  # pinned frames being sent
        self.direct_frames = 0  # pinned frames sent without a fill (diagnostics, tests)
        self._slot = 0
        self._device_buf: Optional[torch.Tensor] = None

    def plan(self, frames: Sequence[np.ndarray]) -> Tuple[List[int], int, List[UploadChunk]]:
        """Offsets, staged size and chunks of one upload of ``frames`` (cached per batch shape:
        planning the chunks is pure Python, and a stream sends the same shape every call)."""
        key = tuple(frame.shape for frame in frames)
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        offsets, total = staging_layout(frames)
        count = auto_upload_chunks(total) if self.chunks is None else self.chunks
        heights = [int(f.shape[0]) for f in frames]
        row_bytes = [int(f.shape[1]) * int(f.shape[2]) for f in frames]
        plan = (offsets, total, plan_upload_chunks(heights, row_bytes, offsets, count))
        self._plans.put(key, plan)
        return plan

    def _fill_pool(self) -> Optional[ThreadPoolExecutor]:
        if self.threads < 1:
            return None
        if self._pool is None:  # persistent; its idle workers end with the process
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fastpath-staging")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def upload(
        self, frames: Sequence[np.ndarray], stream: Optional[torch.cuda.Stream] = None
    ) -> List[torch.Tensor]:
        """Copy ``frames`` into staging and send them, async, on the current CUDA stream of the
        staging's device, which the caller has made current (``stream``, when given, must be
        that stream: it only saves a lookup). The kernel reading the returned device views must
        run on it too, or wait on it. Returns one ``(H, W, 3)`` view per frame (the host slot
        itself on CPU).

        CUDA: frames already in pinned memory (``is_pinned_frame``: e.g. from
        ``pinned_video_source``) skip the fill and are sent by one async copy each, straight from
        their own memory; the stage holds them until that copy is done."""
        pinned = [self._cuda and is_pinned_frame(frame) for frame in frames]
        staged = [frame for frame, direct in zip(frames, pinned) if not direct]
        offsets, total, chunks = self.plan(staged) if staged else ([], 0, [])
        slot = self._slot
        self._slot ^= 1
        if self._pending[slot]:
            self._copied[slot].synchronize()  # DMA from this slot two calls ago (long done)
            self._pending[slot] = False
            self._held[slot] = None
        host = self._host[slot]
        if staged and (host is None or host.numel() < total):
            host = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=self._cuda)
            self._host[slot] = host
        if not self._cuda:
            fill_chunks(host, frames, offsets, chunks, pool=self._fill_pool())
            return [self._view(host, f.shape, o) for f, o in zip(frames, offsets)]

        if stream is None:
            stream = torch.cuda.current_stream(self._device.index)
        direct_frames = [frame for frame, direct in zip(frames, pinned) if direct]
        direct_offsets, direct_total = staging_layout(direct_frames)
        direct_offsets = [total + offset for offset in direct_offsets]  # after the staged frames
        size = total + direct_total
        if self._device_buf is None or self._device_buf.numel() < size:
            # allocated on the current stream: the previous buffer's last reader ran there
            self._device_buf = torch.empty(max(size, 1), dtype=torch.uint8, device=self._device)
        device_buf = self._device_buf
        direct_views = [self._view(device_buf, f.shape, o) for f, o in zip(direct_frames, direct_offsets)]
        sent = []

        def send(chunk: UploadChunk) -> None:
            # on the current stream: after the previous call's kernel, before this one's
            device_buf[chunk.start : chunk.end].copy_(host[chunk.start : chunk.end], non_blocking=True)
            sent.append(chunk)

        try:
            for frame, view in zip(direct_frames, direct_views):
                view.copy_(torch.from_numpy(frame), non_blocking=True)
                sent.append(frame)
            if staged:
                fill_chunks(host, staged, offsets, chunks, send, self._fill_pool())
        finally:
            if sent:  # even on error: the slot must not be refilled under a running DMA
                if self._copied[slot] is None:
                    self._copied[slot] = torch.cuda.Event()
                self._copied[slot].record(stream)
                self._pending[slot] = True
                self._held[slot] = direct_frames  # their memory is read until the event
        self.direct_frames += len(direct_frames)
        staged_views = iter([self._view(device_buf, f.shape, o) for f, o in zip(staged, offsets)])
        direct_iter = iter(direct_views)  # back in the callers' frame order
        return [next(direct_iter) if direct else next(staged_views) for direct in pinned]

    @staticmethod
    def _view(buffer: torch.Tensor, shape: Tuple[int, ...], offset: int) -> torch.Tensor:
        height, width, channels = shape
        return buffer[offset : offset + height * width * channels].view(height, width, channels)

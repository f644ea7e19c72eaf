"""Triton preprocess stage: frames -> normalised NCHW batch, byte-exact with inference-models.

Reproduces ``inference_models.models.rfdetr.pre_processing.pre_process_network_input`` for uint8
frames (numpy HWC, or uint8 tensors HWC / CHW):

* optional static crop;
* when the model package has ``dataset_version_resize_dimensions`` and a resize mode other than
  stretch, the dataset-version step first: ``cv2.resize`` (INTER_LINEAR) letterbox /
  letterbox-reflect-edges (both pad with the constant ``padding_value``), center-crop (crop/pad,
  no resize) or fit-longer-edge into a uint8 canvas (Triton ``_cv2_linear_canvas_kernel``);
* then one PIL ``BILINEAR`` antialiased stretch to the network size fused with the colour swap,
  ``/255`` and mean/std normalisation (Triton ``_pil_resample_normalize_kernel``).

Metadata is computed on the host by :func:`plan_frame` with the reference's arithmetic.

Uploads: numpy frames are copied into a reusable pinned staging buffer (two slots, so filling
one never waits on the copy of the previous call) and sent by async copies on the stage's own
CUDA stream -- large batches in row chunks, each sent as soon as it is filled so the DMA of one
chunk overlaps the fill of the next (:func:`plan_upload_chunks`); CUDA uint8 tensors are read in
place, or, with CUDA graphs on, copied into a static device buffer. With CUDA graphs on, the kernel
launches of a recurring (plan, buffers) combination are captured once and replayed. The stage
records ``ready_event`` on its stream instead of synchronising the host.
Without CUDA it runs the same kernels through ``TRITON_INTERPRET=1`` on CPU tensors.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from inference_models.entities import ColorFormat, ImageDimensions
from inference_models.models.auto_loaders.entities import PreProcessingOverrides
from inference_models.models.common.roboflow.model_packages import (
    ColorMode,
    ImagePreProcessing,
    NetworkInputDefinition,
    PreProcessingMetadata,
    ResizeMode,
    StaticCropOffset,
    TrainingInputSize,
)

from inference_fastpath.adapters.engines.cuda_graphs import (
    BoundedGraphCapture,
    CapturedGraph,
    GraphCaptureStats,
    LRUCache,
)
from inference_fastpath.adapters.cuda_streams import stream_made_current
from inference_fastpath.adapters.pinned_frames import is_pinned_frame
from inference_fastpath.adapters.stages.contracts import Frame, PreprocessedBatch
from inference_fastpath.kernels.preprocess_resize_normalize import (
    OUTPUT_DTYPES,
    Box,
    ResizeNormalizeOp,
    interpreter_active,
    normalization_lut,
)

LOGGER = logging.getLogger("inference_fastpath")

_STAGING_ALIGN = 16  # keeps every staged frame 16-byte aligned (Triton specialises on it)
_PLAN_CACHE_SIZE = 64
# Kernel launches captured per (plan, source buffer, output buffer): a replay costs ~10 us of
# host time where a Triton launch costs 0.1-0.2 ms. A launch is captured the second time its
# key is seen (one-off shapes stay eager); past _MAX_LAUNCH_CAPTURES captures the stage stays
# eager, with the reason logged.
_MAX_LAUNCH_GRAPHS = 8
_MAX_LAUNCH_CAPTURES = 32
_SIGHTED_KEYS = 64


class PlanningError(ValueError):
    """The frame cannot be preprocessed (the reference would fail on it too)."""


# --------------------------------------------------------------------------------------------
# Host-side planning (same arithmetic as the reference)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanvasStep:
    """Dataset-version step: ``cv2.resize`` of ``source`` (frame coordinates) into ``box`` of a
    ``width`` x ``height`` uint8 canvas filled with ``pad_value`` elsewhere."""

    width: int
    height: int
    source: Box
    box: Box
    pad_value: int


@dataclass(frozen=True)
class FramePlan:
    crop: Box  # region of the frame fed to the PIL stretch (static crop) when no canvas step
    canvas: Optional[CanvasStep]
    swap_rb: bool
    metadata: PreProcessingMetadata

    @property
    def launch_key(self) -> Tuple:
        """Frames with equal keys (and equal shapes) can share one kernel launch."""
        return (self.crop, self.canvas, self.swap_rb)


def _static_crop(
    height: int,
    width: int,
    image_pre_processing: ImagePreProcessing,
    overrides: Optional[PreProcessingOverrides],
) -> Tuple[Box, StaticCropOffset]:
    config = image_pre_processing.static_crop
    disabled = overrides is not None and overrides.disable_static_crop
    if not config or not config.enabled or disabled:
        return (0, 0, width, height), StaticCropOffset(
            offset_x=0, offset_y=0, crop_width=width, crop_height=height
        )
    x_min = int(config.x_min / 100 * width)
    y_min = int(config.y_min / 100 * height)
    x_max = int(config.x_max / 100 * width)
    y_max = int(config.y_max / 100 * height)
    # numpy slicing semantics (clamped, possibly empty), as image[y_min:y_max, x_min:x_max]
    xs = range(width)[x_min:x_max]
    ys = range(height)[y_min:y_max]
    if len(xs) == 0 or len(ys) == 0:
        raise PlanningError(f"static crop leaves an empty image from {width}x{height}")
    offset = StaticCropOffset(
        offset_x=x_min, offset_y=y_min, crop_width=len(xs), crop_height=len(ys)
    )
    return (xs.start, ys.start, len(xs), len(ys)), offset


def _letterbox_step(
    crop: Box, canvas_w: int, canvas_h: int, pad_value: int
) -> Tuple[CanvasStep, dict]:
    width, height = crop[2], crop[3]
    scale = min(canvas_w / width, canvas_h / height)
    new_w, new_h = int(width * scale), int(height * scale)
    if new_w < 1 or new_h < 1:
        raise PlanningError(f"letterbox of {width}x{height} into {canvas_w}x{canvas_h} is empty")
    pad_top = int((canvas_h - new_h) / 2)
    pad_left = int((canvas_w - new_w) / 2)
    step = CanvasStep(canvas_w, canvas_h, crop, (pad_left, pad_top, new_w, new_h), pad_value)
    meta = dict(
        pad_left=pad_left,
        pad_top=pad_top,
        pad_right=canvas_w - pad_left - new_w,
        pad_bottom=canvas_h - pad_top - new_h,
        inference_size=ImageDimensions(height=canvas_h, width=canvas_w),
        scale_width=scale,
        scale_height=scale,
    )
    return step, meta


def _center_crop_axis(image: int, canvas: int) -> Tuple[int, int, int, int, int]:
    """(canvas offset, image offset, copied length, reported pad before, reported pad after)."""
    canvas_pad = max(canvas - image, 0)
    canvas_before = canvas_pad // 2
    image_extra = max(image - canvas, 0)
    image_before = image_extra // 2
    if canvas > image:
        reported = (canvas_before, canvas_pad - canvas_before)
    else:
        reported = (-image_before, -(image_extra - image_before))
    return canvas_before, image_before, min(image, canvas), reported[0], reported[1]


def _center_crop_step(crop: Box, canvas_w: int, canvas_h: int) -> Tuple[CanvasStep, dict]:
    cx, ix, w, pad_left, pad_right = _center_crop_axis(crop[2], canvas_w)
    cy, iy, h, pad_top, pad_bottom = _center_crop_axis(crop[3], canvas_h)
    source = (crop[0] + ix, crop[1] + iy, w, h)
    step = CanvasStep(canvas_w, canvas_h, source, (cx, cy, w, h), 0)  # zero canvas, no resize
    meta = dict(
        pad_left=pad_left,
        pad_top=pad_top,
        pad_right=pad_right,
        pad_bottom=pad_bottom,
        inference_size=ImageDimensions(height=canvas_h, width=canvas_w),
        scale_width=1.0,
        scale_height=1.0,
    )
    return step, meta


def _fit_longer_edge_step(crop: Box, canvas_w: int, canvas_h: int) -> Tuple[CanvasStep, dict]:
    width, height = crop[2], crop[3]
    scale_x, scale_y = canvas_w / width, canvas_h / height
    if scale_x < scale_y:
        new_w, new_h = canvas_w, round(scale_x * height)
    else:
        new_w, new_h = round(scale_y * width), canvas_h
    if new_w < 1 or new_h < 1:
        raise PlanningError(f"fit-longer-edge of {width}x{height} is empty")
    step = CanvasStep(new_w, new_h, crop, (0, 0, new_w, new_h), 0)
    meta = dict(
        pad_left=0,
        pad_top=0,
        pad_right=0,
        pad_bottom=0,
        inference_size=ImageDimensions(height=new_h, width=new_w),
        scale_width=new_w / width,
        scale_height=new_h / height,
    )
    return step, meta


def _needs_canvas_step(network_input: NetworkInputDefinition) -> bool:
    return (
        network_input.dataset_version_resize_dimensions is not None
        and network_input.resize_mode != ResizeMode.STRETCH_TO
    )


def plan_frame(
    height: int,
    width: int,
    network_input: NetworkInputDefinition,
    image_pre_processing: ImagePreProcessing,
    input_color_mode: Optional[ColorMode],
    overrides: Optional[PreProcessingOverrides] = None,
) -> FramePlan:
    """Geometry, colour swap and ``PreProcessingMetadata`` of one ``height`` x ``width`` frame,
    computed exactly as RF-DETR's ``pre_process_network_input`` (numpy path) does."""
    target = network_input.training_input_size
    if target is None:
        raise PlanningError("network_input has no training_input_size")
    target_size = ImageDimensions(width=target.width, height=target.height)
    original_size = ImageDimensions(width=width, height=height)
    crop, crop_offset = _static_crop(height, width, image_pre_processing, overrides)
    size_after = ImageDimensions(width=crop[2], height=crop[3])

    if not _needs_canvas_step(network_input):
        # `None != color_mode` is True: the reference swaps when no input format is given.
        swap_rb = input_color_mode != network_input.color_mode
        metadata = PreProcessingMetadata(
            pad_left=0,
            pad_top=0,
            pad_right=0,
            pad_bottom=0,
            original_size=original_size,
            size_after_pre_processing=size_after,
            inference_size=target_size,
            scale_width=target_size.width / size_after.width,
            scale_height=target_size.height / size_after.height,
            static_crop_offset=crop_offset,
        )
        return FramePlan(crop, None, swap_rb, metadata)

    dims = network_input.dataset_version_resize_dimensions
    mode = network_input.resize_mode
    if mode in (ResizeMode.LETTERBOX, ResizeMode.LETTERBOX_REFLECT_EDGES):
        pad = network_input.padding_value or 0
        step, meta = _letterbox_step(crop, dims.width, dims.height, pad)
    elif mode == ResizeMode.CENTER_CROP:
        step, meta = _center_crop_step(crop, dims.width, dims.height)
    elif mode == ResizeMode.FIT_LONGER_EDGE:
        step, meta = _fit_longer_edge_step(crop, dims.width, dims.height)
    else:  # pragma: no cover - ResizeMode has no other member
        raise PlanningError(f"unsupported resize mode {mode}")
    # The dataset-version handler defaults a missing input format to BGR.
    swap_rb = (input_color_mode or ColorMode.BGR) != network_input.color_mode
    metadata = PreProcessingMetadata(
        original_size=original_size,
        size_after_pre_processing=size_after,
        static_crop_offset=crop_offset,
        nonsquare_intermediate_size=meta.pop("inference_size"),
        inference_size=target_size,
        **meta,
    )
    return FramePlan(crop, step, swap_rb, metadata)


def stretch_network_input(height: int, width: int) -> NetworkInputDefinition:
    """An RF-DETR-style network input: stretch to (height, width), RGB, /255, ImageNet mean/std
    (what the benchmarks and tests feed the stage when no model package is at hand)."""
    return NetworkInputDefinition(
        training_input_size=TrainingInputSize(height=height, width=width),
        dynamic_spatial_size_supported=False,
        color_mode=ColorMode.RGB,
        resize_mode=ResizeMode.STRETCH_TO,
        input_channels=3,
        scaling_factor=255,
        normalization=([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    )


def rfdetr_normalization_lut(
    network_input: NetworkInputDefinition, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """LUT of RF-DETR's ``TF.to_tensor`` (always ``/255``) followed by its normalisation: mean/std
    when given, otherwise ``* (255 / scaling_factor)`` for a scaling factor other than 255."""
    if network_input.normalization:
        mean, std = network_input.normalization
        return normalization_lut(mean, std, dtype=dtype)
    factor = network_input.scaling_factor
    if factor is not None and factor != 255:
        return normalization_lut(None, None, multiplier=255.0 / factor, dtype=dtype)
    return normalization_lut(None, None, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Frames -> device views
# --------------------------------------------------------------------------------------------


def _tensor_as_hwc(frame: torch.Tensor) -> torch.Tensor:
    # Same layout rule as the reference's `_tensor_to_hwc_uint8`.
    if frame.dim() == 3 and frame.shape[0] in (1, 3, 4) and frame.shape[-1] not in (1, 3, 4):
        return frame.permute(1, 2, 0)
    return frame


def _frame_hw(frame: Frame) -> Tuple[int, int]:
    if isinstance(frame, torch.Tensor):
        frame = _tensor_as_hwc(frame)
    return int(frame.shape[0]), int(frame.shape[1])


def _frame_problem(frame: Frame, device: torch.device) -> Optional[str]:
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8:
            return f"numpy frame of dtype {frame.dtype} (uint8 only)"
        shape = frame.shape
    elif isinstance(frame, torch.Tensor):
        if frame.dtype != torch.uint8:
            return f"tensor frame of dtype {frame.dtype} (uint8 only)"
        if frame.device.type != "cpu" and frame.device != device:
            return f"tensor frame on {frame.device}, stage runs on {device}"
        shape = tuple(_tensor_as_hwc(frame).shape)
    else:
        return f"frame of type {type(frame).__name__}"
    if len(shape) != 3 or shape[2] != 3:
        return f"frame of shape {tuple(shape)} (3-channel HWC only)"
    if shape[0] < 1 or shape[1] < 1:
        return f"empty frame {tuple(shape)}"
    return None


def _normalize_device(device: torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# Chunked upload policy. A numpy frame is filled into pinned memory and sent with an H2D DMA.
# Split into row chunks, chunk k's DMA can run while chunk k+1 is filled, leaving about
# (fill + DMA) / n exposed on top of max(fill, DMA); each extra chunk costs one more copy_ call
# (host time) and a DMA start-up. Measured on the H100 host (`bench_preprocess_resize_normalize
# --sweep-upload`, examples/results/h100-2026-11-21/): the upload alone improves a little
# (1080p: 0.41 ms in one copy, 0.36 in 4 chunks) but call-to-ready latency gets worse below 4K
# (768x576: 0.47 ms one copy vs 0.51 in 2 chunks; 1080p: 0.58 vs 0.76 in 4), and 4K gains ~3%
# (1.15 vs 1.12 ms in 8). So only batches of at least _CHUNKING_MIN_BYTES are chunked:
# n = round(bytes / _CHUNK_TARGET_BYTES), between 2 and _MAX_UPLOAD_CHUNKS (4K: 8 of ~3.1 MB).
# Chunk boundaries fall on row boundaries (every chunk is whole rows of one or more frames).
_CHUNKING_MIN_BYTES = 16 << 20
_CHUNK_TARGET_BYTES = 3 << 19  # 1.5 MiB
_MAX_UPLOAD_CHUNKS = 8


def auto_upload_chunks(total_bytes: int) -> int:
    """Number of row chunks for an upload of ``total_bytes`` (see the policy above)."""
    if total_bytes < _CHUNKING_MIN_BYTES:
        return 1
    return max(2, min(_MAX_UPLOAD_CHUNKS, round(total_bytes / _CHUNK_TARGET_BYTES)))


def auto_fill_threads() -> int:
    """Worker threads filling chunks: none when torch's CPU copy is already multi-threaded
    (``torch.get_num_threads() > 1``: each chunk copy is split over its intra-op pool), two when
    torch runs single-threaded and the host has the cores for them."""
    if torch.get_num_threads() > 1:
        return 0
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
    use_torch: bool = True,
) -> None:
    """Copy the rows of ``chunk`` from ``frames`` into the uint8 staging tensor ``host``.

    ``use_torch``: torch's CPU copy (split over its intra-op threads) where the frame allows it;
    otherwise, and for negative strides, ``np.copyto`` (one thread, GIL released). (A single
    np.copyto for frames below 4 MiB was tried: no faster inside a running pipeline, 0.28 vs
    0.26 ms for 768x576 by profile_pipeline --timed, and slower in isolation.)"""
    for index, first, last in chunk.pieces:
        frame = frames[index]
        view = _frame_rows(host, frame, offsets[index], first, last)
        rows = frame[first:last]  # any strides, negative included
        if use_torch and frame.flags.writeable and all(s >= 0 for s in frame.strides):
            view.copy_(torch.from_numpy(rows))
        else:
            np.copyto(view.numpy(), rows)


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

    With ``pool`` the fills run on its workers (``np.copyto``: no nested torch threading) while
    this thread sends completed chunks in order. Returns only when no fill is running."""
    if pool is None or len(chunks) < 2:
        for chunk in chunks:
            fill_chunk(host, frames, offsets, chunk)
            if send is not None:
                send(chunk)
        return
    futures = [pool.submit(fill_chunk, host, frames, offsets, c, False) for c in chunks]
    try:
        for chunk, future in zip(chunks, futures):
            future.result()
            if send is not None:
                send(chunk)
    finally:
        for future in futures:  # never leave a worker writing into the slot (error path)
            future.cancel()
        wait(futures)


class _Staging:
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
        self._plans: "OrderedDict[Tuple, Tuple[List[int], int, List[UploadChunk]]]" = OrderedDict()
        self._host: List[Optional[torch.Tensor]] = [None, None]
        self._copied: List[Optional[torch.cuda.Event]] = [None, None]  # one reusable event a slot
        self._pending = [False, False]  # the slot's event marks copies not yet waited for
        self._held: List[Optional[List[np.ndarray]]] = [None, None]  # pinned frames being sent
        self.direct_frames = 0  # pinned frames sent without a fill (diagnostics, tests)
        self._slot = 0
        self._device_buf: Optional[torch.Tensor] = None

    def plan(self, frames: Sequence[np.ndarray]) -> Tuple[List[int], int, List[UploadChunk]]:
        """Offsets, staged size and chunks of one upload of ``frames`` (cached per batch shape:
        planning 4 chunks costs ~10 us of Python, a stream sends the same shape every call)."""
        key = tuple(frame.shape for frame in frames)
        cached = self._plans.get(key)
        if cached is not None:
            self._plans.move_to_end(key)
            return cached
        offsets, total = staging_layout(frames)
        count = auto_upload_chunks(total) if self.chunks is None else self.chunks
        heights = [int(f.shape[0]) for f in frames]
        row_bytes = [int(f.shape[1]) * int(f.shape[2]) for f in frames]
        plan = (offsets, total, plan_upload_chunks(heights, row_bytes, offsets, count))
        self._plans[key] = plan
        while len(self._plans) > _PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
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


def _buffer_key(tensor: torch.Tensor) -> Tuple:
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


def _group_frames(sources: List[torch.Tensor], plans: List[FramePlan]) -> List[Tuple[int, torch.Tensor]]:
    """Split into runs of consecutive frames that share a plan, a shape and strides and sit at a
    constant distance in one storage; each run becomes one batched (N, H, W, 3) view."""
    groups: List[Tuple[int, torch.Tensor]] = []
    start = 0
    while start < len(sources):
        first = sources[start]
        end, delta = start + 1, None
        while end < len(sources):
            cand, prev = sources[end], sources[end - 1]
            step = cand.data_ptr() - prev.data_ptr()
            same = (
                plans[end].launch_key == plans[start].launch_key
                and cand.shape == first.shape
                and cand.stride() == first.stride()
                and cand.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                and step > 0
                and (delta is None or step == delta)
            )
            if not same:
                break
            delta = step
            end += 1
        count = end - start
        batched = torch.as_strided(
            first,
            (count, *first.shape),
            (delta or 0, *first.stride()),
            first.storage_offset(),
        )
        groups.append((start, batched))
        start = end
    return groups


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


class TritonPreprocess(GraphCaptureStats):
    """Preprocess stage (``PreprocessStage`` protocol) running the fused Triton kernels."""

    name = "triton_preprocess"

    def __init__(
        self,
        network_input: NetworkInputDefinition,
        image_pre_processing: ImagePreProcessing,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        input_color_format: Optional[ColorFormat] = "bgr",
        pre_processing_overrides: Optional[PreProcessingOverrides] = None,
        upload_chunks: Optional[int] = None,
        upload_threads: Optional[int] = None,
        cuda_graphs: bool = True,
    ) -> None:
        """``upload_chunks`` / ``upload_threads``: row chunks per numpy upload and fill workers
        (``None``: chosen automatically, see :class:`_Staging`; ``upload_chunks=1``: one copy).
        ``cuda_graphs``: replay captured kernel launches for recurring frame shapes (CUDA)."""
        if dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.network_input = network_input
        self.image_pre_processing = image_pre_processing
        self.device = _normalize_device(device)
        self.dtype = dtype
        self.input_color_mode = ColorMode(input_color_format) if input_color_format else None
        self.overrides = pre_processing_overrides
        self._config_problem = self._check_config()
        self._lock = threading.Lock()  # one call at a time: staging/output buffers are reused
        self._plan_lock = threading.Lock()
        self._plans: "OrderedDict[Tuple[int, int], FramePlan]" = OrderedDict()
        self._cuda = self.device.type == "cuda"
        usable_cuda = self._cuda and self._config_problem is None
        self._stream = torch.cuda.Stream(self.device) if usable_cuda else None
        self._op = ResizeNormalizeOp(self.device)
        self._staging = _Staging(self.device, chunks=upload_chunks, threads=upload_threads)
        self._out: Optional[torch.Tensor] = None
        self._canvas: Optional[torch.Tensor] = None
        self._luts: Dict[torch.dtype, torch.Tensor] = {}  # one per output dtype
        # CUDA graphs of kernel launches (see _launch_group); CUDA frames are then copied into a
        # static device buffer so every launch reads a fixed address
        self.cuda_graphs = bool(cuda_graphs) and self._stream is not None
        self._captures = (
            BoundedGraphCapture("triton preprocess", self.device, _MAX_LAUNCH_CAPTURES, "frame shapes / buffers")
            if self.cuda_graphs else None
        )
        self._graphs: LRUCache[Tuple, CapturedGraph] = LRUCache(_MAX_LAUNCH_GRAPHS, on_evict=self._free_graph)
        self._sighted: "OrderedDict[Tuple, None]" = OrderedDict()
        self._device_frames: Optional[torch.Tensor] = None
        if self._config_problem is None:
            self._lut(dtype)

    @property
    def pinned_frames_sent(self) -> int:
        """Numpy frames found in pinned memory and sent without a staging fill, so far."""
        return self._staging.direct_frames

    # -- support checks ----------------------------------------------------------------------

    def _check_config(self) -> Optional[str]:
        ni, ipp, ov = self.network_input, self.image_pre_processing, self.overrides
        if self.device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA device requested but CUDA is not available"
        if self.device.type == "cpu" and not interpreter_active():
            return "no CUDA and Triton interpreter off (set TRITON_INTERPRET=1 before import)"
        if self.device.type not in ("cuda", "cpu"):
            return f"device {self.device} is not supported"
        if ni.training_input_size is None:
            return "network input has no fixed training_input_size"
        if ni.input_channels != 3:
            return f"network expects {ni.input_channels} channels (3 only)"
        if ipp.grayscale and ipp.grayscale.enabled and not (ov and ov.disable_grayscale):
            return "grayscale preprocessing is not implemented in the Triton stage"
        if ipp.contrast and ipp.contrast.enabled and not (ov and ov.disable_contrast_enhancement):
            return f"contrast preprocessing ({ipp.contrast.type.value}) is not implemented"
        if _needs_canvas_step(ni) and ni.resize_mode in (
            ResizeMode.LETTERBOX,
            ResizeMode.LETTERBOX_REFLECT_EDGES,
        ) and not 0 <= (ni.padding_value or 0) <= 255:
            return f"padding_value {ni.padding_value} is not a uint8 value"
        if ni.normalization:
            mean, std = ni.normalization
            if len(mean) != 3 or len(std) != 3:
                return "normalization must have 3 means and 3 stds"
            if any(float(np.float32(s)) == 0.0 for s in std):
                return "normalization std is zero"
        return None

    def unsupported_reason(self, frames: Sequence[Frame]) -> Optional[str]:
        """Why this stage cannot process ``frames`` (None when it can)."""
        if self._config_problem is not None:
            return self._config_problem
        if len(frames) == 0:
            return "empty batch"
        for index, frame in enumerate(frames):
            problem = _frame_problem(frame, self.device)
            if problem is None:
                try:
                    self._plan(*_frame_hw(frame))
                except PlanningError as error:
                    problem = str(error)
            if problem is not None:
                return f"frame {index}: {problem}"
        return None

    # -- planning / buffers ------------------------------------------------------------------

    def _plan(self, height: int, width: int) -> FramePlan:
        key = (height, width)
        with self._plan_lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = plan_frame(
            height, width, self.network_input, self.image_pre_processing,
            self.input_color_mode, self.overrides,
        )
        with self._plan_lock:
            self._plans[key] = plan
            while len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    def _output(self, batch: int) -> torch.Tensor:
        size = self.network_input.training_input_size
        if self._out is None or self._out.shape[0] < batch:
            self._out = torch.empty(
                (batch, 3, size.height, size.width), dtype=self.dtype, device=self.device
            )
        return self._out[:batch]

    def _check_out(self, out: torch.Tensor, batch: int) -> None:
        size = self.network_input.training_input_size
        expected = (batch, 3, size.height, size.width)
        if tuple(out.shape) != expected:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {expected}")
        if out.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"out must be float32, float16 or bfloat16, got {out.dtype}")
        if out.device != self.device:
            raise ValueError(f"out is on {out.device}, stage runs on {self.device}")

    def _lut(self, dtype: torch.dtype) -> torch.Tensor:
        lut = self._luts.get(dtype)
        if lut is None:  # built once per dtype; a blocking copy (first call only)
            lut = rfdetr_normalization_lut(self.network_input, dtype).to(self.device)
            self._luts[dtype] = lut
        return lut

    def _canvas_buffer(self, count: int, step: CanvasStep) -> torch.Tensor:
        need = count * step.height * step.width * 3
        if self._canvas is None or self._canvas.numel() < need:
            self._canvas = torch.empty(need, dtype=torch.uint8, device=self.device)
        return self._canvas[:need].view(count, step.height, step.width, 3)

    # -- run ----------------------------------------------------------------------------------

    def __call__(
        self, frames: Sequence[Frame], out: Optional[torch.Tensor] = None
    ) -> PreprocessedBatch:
        """Preprocess ``frames`` into ``out`` (or the stage's reusable buffer, valid until the
        next call).

        On CUDA the work runs on the stage's stream after everything already queued on the
        caller's current stream (where frames are produced and ``out`` is read); consumers wait
        on ``ready_event``. A consumer that keeps the stage's own buffer on another stream past
        the next call should ``record_stream`` it.
        """
        reason = self.unsupported_reason(frames)
        if reason is not None:
            raise ValueError(f"TritonPreprocess cannot run: {reason}")
        return self.run_supported(frames, out)

    def run_supported(self, frames: Sequence[Frame], out: Optional[torch.Tensor] = None) -> PreprocessedBatch:
        """``__call__`` for frames :meth:`unsupported_reason` has just accepted (no second check
        on the hot path)."""
        with self._lock:
            if not self._cuda:
                return self._run(frames, out)
            # the stage's stream is current for the whole call: the upload, the launches and the
            # event use it
            with stream_made_current(self._stream) as producer:
                self._stream.wait_stream(producer)  # frames / `out` readers queued so far first
                batch = self._run(frames, out)
                batch.ready_event = torch.cuda.Event()
                batch.ready_event.record(self._stream)
            if out is not None:
                out.record_stream(self._stream)
            for frame in frames:
                if isinstance(frame, torch.Tensor) and frame.is_cuda:
                    frame.record_stream(self._stream)
            return batch

    def _run(self, frames: Sequence[Frame], out: Optional[torch.Tensor]) -> PreprocessedBatch:
        plans = [self._plan(*_frame_hw(frame)) for frame in frames]
        if out is None:
            out = self._output(len(frames))
        else:
            self._check_out(out, len(frames))
        sources = self._sources(frames)
        for start, group in _group_frames(sources, plans):
            plan = plans[start]
            target = out[start : start + group.shape[0]]
            self._launch_group(plan, group, target)
        return PreprocessedBatch(tensor=out, metadata=[plan.metadata for plan in plans])

    def _sources(self, frames: Sequence[Frame]) -> List[torch.Tensor]:
        """(H, W, 3) uint8 views on the stage device; host frames go through staging."""
        sources: List[Optional[torch.Tensor]] = [None] * len(frames)
        host_index, host_frames = [], []
        device_index = []
        for index, frame in enumerate(frames):
            if isinstance(frame, torch.Tensor) and frame.device == self.device:
                sources[index] = _tensor_as_hwc(frame)
                device_index.append(index)
            else:
                array = frame if isinstance(frame, np.ndarray) else _tensor_as_hwc(frame).numpy()
                host_index.append(index)
                host_frames.append(array)
        if host_frames:
            # CUDA: sent on the current stream, the stage's (run_supported), where the kernels run
            views = self._staging.upload(host_frames, self._stream)
            for index, view in zip(host_index, views):
                sources[index] = view
        if device_index and self._captures is not None and self._captures.fallback_reason is None:
            for index, view in zip(device_index, self._static_device_copies([sources[i] for i in device_index])):
                sources[index] = view
        return sources  # type: ignore[return-value]

    def _static_device_copies(self, frames: List[torch.Tensor]) -> List[torch.Tensor]:
        """Device frames copied (on the current stream) into one reusable buffer: fixed
        addresses, so their launches can be captured and replayed."""
        offsets, total = staging_layout(frames)
        if self._device_frames is None or self._device_frames.numel() < total:
            self._device_frames = torch.empty(max(total, 1), dtype=torch.uint8, device=self.device)
        views = []
        for frame, offset in zip(frames, offsets):
            view = _Staging._view(self._device_frames, tuple(frame.shape), offset)
            view.copy_(frame, non_blocking=True)
            views.append(view)
        return views

    # -- launches: eager, or captured once per (plan, buffers) and replayed --------------------

    def _launch_group(self, plan: FramePlan, group: torch.Tensor, target: torch.Tensor) -> None:
        if self._captures is None or self._captures.fallback_reason is not None:
            self._launch(plan, group, target)
            return
        key = (plan.launch_key, _buffer_key(group), _buffer_key(target))
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if key not in self._sighted:  # first sighting: eager; captured if the shape comes back
            self._sighted[key] = None
            while len(self._sighted) > _SIGHTED_KEYS:
                self._sighted.popitem(last=False)
            self._launch(plan, group, target)
            return
        used: List[torch.Tensor] = []  # what the launches read besides group and target

        def launch():
            self._launch(plan, group, target)
            return ()

        self._op.keep = used
        try:
            # the warm-up launch inside computes this call's output; the capture only records
            graph = self._captures.capture(launch, keepalive=(group, target, used))
        finally:
            self._op.keep = None
        if graph is None:  # no capture (bound reached or capture failed): launch eagerly
            self._launch(plan, group, target)
            return
        self._graphs.put(key, graph)

    def _free_graph(self, _key: Tuple, graph: CapturedGraph) -> None:
        self._stream.synchronize()  # a replay of it may still be queued (evictions are rare)
        if graph.free is not None:
            graph.free()

    def _launch(self, plan: FramePlan, group: torch.Tensor, target: torch.Tensor) -> None:
        """The kernel launch(es) of one group. While a capture runs, the op's ``keep`` list
        collects every buffer they read besides ``group`` and ``target`` (the LUT and canvas
        here, the coefficient tables in the op): the graph keeps them alive."""
        keep = self._op.keep
        lut = self._lut(target.dtype)
        if keep is not None:
            keep.append(lut)
        if plan.canvas is None:
            self._op.resize_normalize(group, target, lut, crop=plan.crop, swap_rb=plan.swap_rb)
            return
        step = plan.canvas
        canvas = self._canvas_buffer(group.shape[0], step)
        if keep is not None:
            keep.append(canvas)
        self._op.linear_resize_into_canvas(
            group, canvas, crop=step.source, box=step.box, pad_value=step.pad_value
        )
        self._op.resize_normalize(canvas, target, lut, swap_rb=plan.swap_rb)


__all__ = [
    "CanvasStep",
    "FramePlan",
    "PlanningError",
    "TritonPreprocess",
    "UploadChunk",
    "auto_upload_chunks",
    "fill_chunks",
    "plan_frame",
    "plan_upload_chunks",
    "rfdetr_normalization_lut",
    "staging_layout",
    "stretch_network_input",
]

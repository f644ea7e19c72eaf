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

import logging
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from inference_models.entities import ColorFormat
from inference_models.models.auto_loaders.entities import PreProcessingOverrides
from inference_models.models.common.roboflow.model_packages import (
    ColorMode,
    ImagePreProcessing,
    NetworkInputDefinition,
    ResizeMode,
)

from inference_fastpath.adapters.engine.graphs import (
    GraphCache,
    GraphCaptureStats,
    side_stream_capture,
)
from inference_fastpath.adapters.caches import LRUCache
from inference_fastpath.adapters.cuda.streams import stream_made_current
from inference_fastpath.adapters.contracts import Frame, InputBuffer, PreprocessedBatch, Verdict
from inference_fastpath.adapters.preprocess.planning import (
    CanvasStep,
    FramePlan,
    PlanningError,
    needs_canvas_step,
    plan_frame,
    rfdetr_normalization_lut,
)
from inference_fastpath.adapters.preprocess.upload import Staging, staging_layout
from inference_fastpath.kernels.triton_runtime import unavailable_reason
from inference_fastpath.kernels.preprocess_resize_normalize import (
    OUTPUT_DTYPES,
    ResizeNormalizeOp,
)
LOGGER = logging.getLogger("inference_fastpath")

_STAGING_ALIGN = 16  # keeps every staged frame 16-byte aligned (Triton specialises on it)
_PLAN_CACHE_SIZE = 64
# Kernel launches captured per (plan, source buffer, output buffer): a graph replay costs a small
# fraction of the host time of Triton launches. A launch is captured the second time its
# key is seen (one-off shapes stay eager); past _MAX_LAUNCH_CAPTURES captures no new key is
# captured (the cached ones still replay), with the reason logged. The batch size is part of the
# key and, unlike the engine's, is not padded (padding frames would be resized for nothing): room
# for every size of a 32-source batch and a second frame shape, because an eviction waits for the
# stage's stream, and these graphs hold no memory of their own.
_MAX_LAUNCH_GRAPHS = 72
_MAX_LAUNCH_CAPTURES = 144


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
        (``None``: chosen automatically, see :class:`Staging`; ``upload_chunks=1``: one copy).
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
        self._plans: LRUCache[Tuple[int, int], FramePlan] = LRUCache(_PLAN_CACHE_SIZE)
        self._cuda = self.device.type == "cuda"
        usable_cuda = self._cuda and self._config_problem is None
        self._stream = torch.cuda.Stream(self.device) if usable_cuda else None
        self._op = ResizeNormalizeOp(self.device)
        self._staging = Staging(self.device, chunks=upload_chunks, threads=upload_threads)
        self._out: Optional[torch.Tensor] = None
        self._canvas: Optional[torch.Tensor] = None
        self._luts: Dict[torch.dtype, torch.Tensor] = {}  # one per output dtype
        # CUDA graphs of kernel launches (see _launch_group); CUDA frames are then copied into a
        # static device buffer so every launch reads a fixed address
        self.cuda_graphs = bool(cuda_graphs) and self._stream is not None
        self._graphs: Optional[GraphCache] = (
            GraphCache(
                "triton preprocess", capture=side_stream_capture(self.device), capacity=_MAX_LAUNCH_GRAPHS,
                max_captures=_MAX_LAUNCH_CAPTURES, what="frame shapes / buffers",
                capture_after=2,  # one-off shapes stay eager; a shape that comes back is captured
                replay_after_capture=False,  # the capture's warm-up launch computed this call's output
                before_evict=lambda _key: self._stream.synchronize(),  # a replay may still be queued
            )
            if self.cuda_graphs else None
        )
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
        unavailable = unavailable_reason(self.device)
        if unavailable is not None:
            return unavailable
        if ni.training_input_size is None:
            return "network input has no fixed training_input_size"
        if ni.input_channels != 3:
            return f"network expects {ni.input_channels} channels (3 only)"
        if ipp.grayscale and ipp.grayscale.enabled and not (ov and ov.disable_grayscale):
            return "grayscale preprocessing is not implemented in the Triton stage"
        if ipp.contrast and ipp.contrast.enabled and not (ov and ov.disable_contrast_enhancement):
            return f"contrast preprocessing ({ipp.contrast.type.value}) is not implemented"
        if needs_canvas_step(ni) and ni.resize_mode in (
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
                return plan
        plan = plan_frame(
            height, width, self.network_input, self.image_pre_processing,
            self.input_color_mode, self.overrides,
        )
        with self._plan_lock:
            self._plans.put(key, plan)
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

    def check(self, frames: Sequence[Frame], input_buffer: Optional[InputBuffer] = None) -> Verdict:
        """Whether these frames run here (the fast-stage contract, ``adapters/fallback.py``)."""
        return Verdict(self.unsupported_reason(frames))

    def run_checked(self, verdict: Verdict, frames: Sequence[Frame],
                    input_buffer: Optional[InputBuffer] = None) -> PreprocessedBatch:
        """Preprocess accepted frames straight into the engine's input buffer when one is given."""
        return self.run_supported(frames, input_buffer(len(frames)) if input_buffer is not None else None)

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
        if device_index and self._graphs is not None and self._graphs.disabled_reason is None:
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
            view = Staging._view(self._device_frames, tuple(frame.shape), offset)
            view.copy_(frame, non_blocking=True)
            views.append(view)
        return views

    # -- launches: eager, or captured once per (plan, buffers) and replayed --------------------

    def _launch_group(self, plan: FramePlan, group: torch.Tensor, target: torch.Tensor) -> None:
        if self._graphs is not None:
            key = (plan.launch_key, _buffer_key(group), _buffer_key(target))
            used: List[torch.Tensor] = []  # what the launches read besides group and target

            def launch() -> Tuple:
                self._launch(plan, group, target, keep=used)
                return ()


            if self._graphs.run(key, lambda: (launch, (group, target, used))) is not None:
                return
        self._launch(plan, group, target)

    def _launch(self, plan: FramePlan, group: torch.Tensor, target: torch.Tensor,
                keep: Optional[List[torch.Tensor]] = None) -> None:
        """The kernel launch(es) of one group. While a capture runs, ``keep`` collects every
        buffer they read besides ``group`` and ``target`` (the LUT and canvas here, the
        coefficient tables in the op): the graph keeps them alive."""
        lut = self._lut(target.dtype)
        if keep is not None:
            keep.append(lut)
        if plan.canvas is None:
            self._op.resize_normalize(group, target, lut, crop=plan.crop, swap_rb=plan.swap_rb, keep=keep)
            return
        step = plan.canvas
        canvas = self._canvas_buffer(group.shape[0], step)
        if keep is not None:
            keep.append(canvas)
        self._op.linear_resize_into_canvas(
            group, canvas, crop=step.source, box=step.box, pad_value=step.pad_value, keep=keep
        )
        self._op.resize_normalize(canvas, target, lut, swap_rb=plan.swap_rb, keep=keep)

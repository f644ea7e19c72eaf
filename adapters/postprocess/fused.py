"""Fused (Triton) RF-DETR instance-segmentation postprocess stage.

Drop-in twin of the reference stage built on inference-models'
``post_process_instance_segmentation_results`` / ``..._to_rle_masks``: same
detections, same order, same boxes, pixel-identical dense masks and byte-identical RLE.

The device work of a batch is one fixed-shape program (``program.py``):
on CUDA it is captured once per output shape in a CUDA graph and replayed on a
high-priority stream, and the host waits once per batch for a header plus a payload
prefix in pinned memory. The engine outputs are copied into the program's static
inputs first and released right after that copy, so the engine can run the next frame
while this one is decoded.

:meth:`check` says per call what the stage does not do, so ``adapters/fallback.py`` hands
that call to the reference twin with a logged reason instead of returning something
different.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from inference_models.models.common.roboflow.model_packages import PreProcessingMetadata

from inference_fastpath.adapters.caches import LRUCache
from inference_fastpath.adapters.cuda.streams import stream_made_current
from inference_fastpath.adapters.engine.batch_padding import GRAPH_CACHE_SIZE, BatchPadding
from inference_fastpath.adapters.engine.graphs import (
    CapturedGraph,
    GraphCache,
    GraphCaptureStats,
    side_stream_capture,
)
from inference_fastpath.adapters.contracts import (
    FrameDetections,
    PostprocessRequest,
    RawOutputs,
    Verdict,
)
from inference_fastpath.adapters.postprocess.mask_buffers import MaskBufferPool
from inference_fastpath.adapters.postprocess.program import (
    DENSE,
    RUNS,
    STRINGS,
    PostprocessProgram,
    ProgramSpec,
    grown,
    spec_for,
)
from inference_fastpath.kernels.mask_resize import (
    NEAR_EXACT_RELATIVE_BOUND,
    AccumulationRecipe,
    calibrate_accumulation,
)
from inference_fastpath.kernels.frame_geometry import FrameGeometry, frame_geometry
from inference_fastpath.kernels.triton_runtime import unavailable_reason

LOGGER = logging.getLogger("inference_fastpath")

_OUTPUTS = {"compact": RUNS, "dense": DENSE, "rle": STRINGS}  # mask_format -> program output
_MIN_QUERIES = 33  # torch.topk(k <= 32) orders ties with a bitonic sort we do not replay
# Payload room per output kind: (device buffer elements, elements copied with the header).
# RUNS: int32 transition positions (a 1080p frame with 10 masks needs ~10-20 k);
# STRINGS: bytes of COCO strings (~1-2 per run); DENSE: bytes of bit-packed crops.
# All grow on demand, the copied prefix up to _MAX_PREFIX.
_DEFAULT_SIZES = {RUNS: (1 << 20, 1 << 15), STRINGS: (1 << 21, 1 << 16), DENSE: (1 << 22, 1 << 17)}
_MAX_PREFIX = {RUNS: 1 << 20, STRINGS: 1 << 22, DENSE: 1 << 22}
_MAX_PROGRAMS = GRAPH_CACHE_SIZE  # live programs (static buffers + graph) per stage, least recently used evicted
_MAX_CAPTURES = 16  # beyond this many captures (thresholds changing per frame?) run eagerly


class FusedPostprocess(GraphCaptureStats):
    """Triton postprocess for RF-DETR segmentation (see module docstring).

    Not thread-safe (reuses pinned host buffers); use one instance per worker.
    Pass ``raw`` to :meth:`unsupported_reason` when available: checks that depend on
    the engine outputs (dtypes, query count, padding vs mask grid) otherwise only run
    inside ``__call__``, which raises ``ValueError`` instead of falling back.
    """

    name = "fused_postprocess"

    def __init__(self, num_classes: int, classes_re_mapping: Optional[Any], device: Union[str, torch.device],
                 cuda_graphs: bool = True, accumulation: Optional[AccumulationRecipe] = None,
                 pad_partial_batches: Optional[bool] = None):
        """``pad_partial_batches``: run a partial batch in the program of a padded size
        (:class:`BatchPadding`), so changing batch sizes reuse a few programs and graphs; None:
        when graphs are on. The padding frames select nothing for thresholds >= 0; under a negative
        threshold they select detections that are computed and never decoded."""
        self.num_classes = int(num_classes)
        self.classes_re_mapping = classes_re_mapping
        self.device = torch.device(device)
        self._class_mapping: Optional[torch.Tensor] = None
        if classes_re_mapping is not None:
            self._class_mapping = classes_re_mapping.class_mapping.to(self.device, torch.int32)
        self._n_output_classes = self.num_classes
        if self._class_mapping is not None:
            mapping = classes_re_mapping.class_mapping
            self._n_output_classes = int(mapping.max().item()) + 1 if mapping.numel() else 0
        self._recipe = accumulation  # None: calibrated against torch on first use
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs: Optional[GraphCache] = None  # CUDA only
        self._programs: LRUCache[ProgramSpec, PostprocessProgram] = LRUCache(_MAX_PROGRAMS, on_evict=self._drop_graph)
        self._sizes: Dict[tuple, Tuple[int, int]] = {}  # (output, geometries) -> (payload, prefix)
        self._last_spec: Optional[ProgramSpec] = None
        self._mask_pool = MaskBufferPool()  # dense masks: recycled host buffers (page faults)
        self._stream = None
        if self.device.type == "cuda" and torch.cuda.is_available():
            # high priority: the small postprocess kernels of frame N go ahead of the engine
            # kernels of frame N+1 that a depth-2 pipeline has already queued
            self._stream = torch.cuda.Stream(self.device, priority=-1)
            if self.cuda_graphs:
                self._graphs = GraphCache(
                    "fused postprocess", capture=side_stream_capture(self.device), capacity=_MAX_PROGRAMS,
                    max_captures=_MAX_CAPTURES, what="output shapes/thresholds",
                    replay_after_capture=False,  # the capture's warm-up call computed the result
                    before_evict=lambda _spec: self._stream.synchronize(),  # a replay may be queued
                )
            self.accumulation_mode()  # one-off kernel compile + check at build time, not mid-stream
        pad = self._graphs is not None if pad_partial_batches is None else pad_partial_batches
        self._padding: Optional[BatchPadding] = BatchPadding() if pad else None

    # ------------------------------------------------------------------ capability checks

    def accumulation(self) -> AccumulationRecipe:
        """The resize accumulation recipe used on this device (see :class:`AccumulationRecipe`)."""
        if self._recipe is None:
            self._recipe = calibrate_accumulation(self.device)
        return self._recipe

    def accumulation_mode(self) -> int:
        """Resize accumulation recipe matching torch on this device (-1: none is close enough)."""
        return self.accumulation().mode

    @property
    def precision_note(self) -> Optional[str]:
        """None when masks are bit-exact; else what the near-exact mode may change."""
        recipe = self.accumulation()
        if recipe.exact or not recipe.usable:
            return None
        return (
            f"near-exact masks: no recorded accumulation recipe reproduces torch {torch.__version__}'s resize "
            f"bit for bit on {self.device}; the closest is off by {recipe.max_relative_error:.1e} of the local "
            f"logit magnitude, so a mask pixel can differ only where |logit| <= 2**-20 of it"
        )

    def unsupported_reason(
        self,
        metadata: Sequence[PreProcessingMetadata],
        request: PostprocessRequest,
        raw: Optional[RawOutputs] = None,
    ) -> Optional[str]:
        """Why this stage cannot reproduce the reference for this call, or None.

        ``raw`` is optional; without it, output-dependent checks (dtypes, query count,
        padding vs mask grid) are done again at call time, which raises ``ValueError``.
        """
        return self._assess(metadata, request, raw)[0]

    def check(self, raw: RawOutputs, metadata: List[PreProcessingMetadata], request: PostprocessRequest) -> Verdict:
        """Whether this call reproduces the reference (the fast-stage contract, ``adapters/fallback.py``);
        an accepted verdict carries the per-frame geometries the run reuses."""
        reason, geometries = self._assess(metadata, request, raw)
        return Verdict(reason, geometries)

    def run_checked(self, verdict: Verdict, raw: RawOutputs, metadata: List[PreProcessingMetadata],
                    request: PostprocessRequest) -> List[FrameDetections]:
        return self.run_supported(raw, metadata, request, verdict.prepared)

    def _assess(
        self,
        metadata: Sequence[PreProcessingMetadata],
        request: PostprocessRequest,
        raw: Optional[RawOutputs] = None,
    ) -> Tuple[Optional[str], Optional[Tuple[FrameGeometry, ...]]]:
        """``(reason, None)`` when this call is not supported; else ``(None, geometries)``: the
        per-frame geometries the check computed (given ``raw``; else None), which
        :meth:`run_supported` takes instead of computing them again."""
        unavailable = unavailable_reason(self.device)
        if unavailable is not None:
            return f"fused postprocess: {unavailable}", None
        if request.mask_format not in _OUTPUTS:
            return f"mask_format {request.mask_format!r} is not supported", None
        if request.max_detections is not None and int(request.max_detections) < 0:
            return "negative max_detections", None
        thr = request.threshold
        if isinstance(thr, torch.Tensor):
            if thr.dim() != 1:
                return "per-class threshold must be a 1-D tensor", None
            if thr.numel() < self._n_output_classes:
                return "per-class threshold is shorter than the class list", None
        for meta in metadata:
            if min(meta.pad_left, meta.pad_top, meta.pad_right, meta.pad_bottom) < 0:
                return "negative letterbox padding", None
        geometries = None
        if raw is not None:
            reason, geometries = self._raw_check(metadata, raw)
            if reason:
                return reason, None
            if self.device.type == "cpu" and _has_exact_score_ties(raw.logits, thr, self._kept_columns(raw)):
                # the kernels order exact ties as torch.topk does on CUDA; the CPU order differs
                return "exact score ties on the CPU (CUDA's top-k tie order is replayed, not the CPU's)", None
        recipe = self.accumulation()
        if not recipe.usable:
            return (
                f"torch's bilinear resize arithmetic could not be reproduced on this device (closest recipe off by "
                f"{recipe.max_relative_error:.1e} of the logit magnitude, bound {NEAR_EXACT_RELATIVE_BOUND:.1e})"
            ), None
        return None, geometries

    def _kept_columns(self, raw: RawOutputs) -> torch.Tensor:
        """Logit columns whose detections can reach the output (no-object and removed classes
        are dropped after the top-k)."""
        columns = torch.arange(raw.logits.shape[-1], device=raw.logits.device)
        if self._class_mapping is None:
            return columns[columns < self.num_classes]
        mapping = self._class_mapping.to(raw.logits.device)
        inside = columns < mapping.numel()
        keep = inside.clone()
        keep[inside] = mapping[columns[inside]] >= 0
        return columns[keep]

    def _raw_check(
        self, metadata: Sequence[PreProcessingMetadata], raw: RawOutputs
    ) -> Tuple[Optional[str], Optional[Tuple[FrameGeometry, ...]]]:
        if raw.logits.dtype != torch.float32 or raw.boxes.dtype != torch.float32:
            return "fused selection needs float32 logits and boxes", None
        if raw.masks.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"unsupported mask dtype {raw.masks.dtype}", None
        if raw.logits.dim() != 3 or raw.boxes.dim() != 3 or raw.masks.dim() != 4:
            return "unexpected engine output ranks", None
        if raw.logits.shape[1] < _MIN_QUERIES:
            return "fewer than 33 queries (top-k tie order not reproduced)", None
        if len(metadata) != raw.logits.shape[0]:
            return "metadata length does not match the batch", None
        mh, mw = int(raw.masks.shape[-2]), int(raw.masks.shape[-1])
        geometries = []
        for meta in metadata:
            try:
                g = frame_geometry(meta, mh, mw)
            except ValueError as error:
                return str(error), None
            if self.device.type == "cpu" and g.crop_w == g.target_w == 1 and g.crop_h != g.target_h:
                # torch's CPU antialiased resize of a (H, 1) -> (H', 1) image returns the first
                # row everywhere; the fused kernels compute the real resize (as CUDA does)
                return "1-pixel-wide mask on CPU (torch's CPU resize is wrong there; not replayed)", None
            geometries.append(g)
        return None, tuple(geometries)

    # ------------------------------------------------------------------ main entry

    def __call__(
        self,
        raw: RawOutputs,
        metadata: List[PreProcessingMetadata],
        request: PostprocessRequest,
    ) -> List[FrameDetections]:
        reason, geometries = self._assess(metadata, request, raw)
        if reason is not None:
            # raw outputs are left untouched (not released) so the caller can fall back
            raise ValueError(f"FusedPostprocess cannot handle this call: {reason}")
        return self.run_supported(raw, metadata, request, geometries)

    def run_supported(
        self,
        raw: RawOutputs,
        metadata: List[PreProcessingMetadata],
        request: PostprocessRequest,
        geometries: Optional[Tuple[FrameGeometry, ...]] = None,
    ) -> List[FrameDetections]:
        """``__call__`` for a call :meth:`check` (given ``raw``) has just accepted; ``geometries``:
        the ones that check returned (None: computed here)."""
        released = []

        def release(event=None) -> None:
            if raw.release is not None and not released:
                released.append(True)
                raw.release(event)

        try:
            if self._stream is None:
                return self._run(raw, metadata, request, release, geometries)
            if raw.done_event is not None:
                self._stream.wait_event(raw.done_event)
            with stream_made_current(self._stream):
                return self._run(raw, metadata, request, release, geometries)
        finally:
            release()  # after an error: the copies (if any) were enqueued before it

    def _run(self, raw: RawOutputs, metadata: List[PreProcessingMetadata], request: PostprocessRequest,
             release, geoms: Optional[Tuple[FrameGeometry, ...]]) -> List[FrameDetections]:
        if geoms is None:
            mh, mw = int(raw.masks.shape[-2]), int(raw.masks.shape[-1])
            geoms = tuple(frame_geometry(m, mh, mw) for m in metadata)
        output = _OUTPUTS[request.mask_format]
        batch = len(geoms) if self._padding is None else self._padding(len(geoms))
        geoms = geoms + (geoms[-1],) * (batch - len(geoms))  # the padding frames' geometry: any valid one
        sizes_key = (output, geoms)
        capacity, prefix = self._sizes.get(sizes_key, _DEFAULT_SIZES[output])
        spec = spec_for(raw, geoms, output, request.max_detections, request.threshold, capacity, prefix,
                        self.accumulation_mode(), batch=batch)
        program = self._program(spec)
        self._last_spec = spec
        program.load(raw, request.threshold)
        release(self._record_event())  # the engine may reuse its outputs once the copies ran
        results = self._execute(program, request.mask_format)
        while results is None:  # the payload did not fit: size up once and run the copy again
            needed = program.payload_total
            spec = replace(spec, payload_capacity=grown(spec.payload_capacity, needed, needed * 2),
                           prefix=grown(spec.prefix, needed, _MAX_PREFIX[output]))
            LOGGER.info("fused postprocess: payload of %d elements; device buffer grows to %d",
                        needed, spec.payload_capacity)
            bigger = self._program(spec)
            bigger.load_from(program)
            program = bigger
            results = self._execute(program, request.mask_format)
        if program.payload_total > spec.prefix and spec.prefix < _MAX_PREFIX[output]:
            # next frames of this shape copy a longer prefix with the header (no second wait)
            prefix = grown(spec.prefix, int(program.payload_total * 1.25), _MAX_PREFIX[output])
        self._sizes[sizes_key] = (spec.payload_capacity, max(prefix, spec.prefix))
        if self._padding is not None:
            self._capture_padded_sizes(spec, request.threshold)
        return results

    def _capture_padded_sizes(self, spec: ProgramSpec, threshold: Union[float, torch.Tensor]) -> None:
        """Builds and captures the programs of the smaller padded batch sizes once the largest batch
        has held (:meth:`BatchPadding.sizes_to_prepare`), so a partial batch later replays instead
        of capturing mid-stream. Only when every frame has one geometry (cameras of one
        resolution): the padded programs of mixed batches depend on which frames come. They start
        with this batch's payload room."""
        if self._graphs is None or not self._padding.sizes_pending or len(set(spec.geometries)) != 1:
            return  # geometry before asking: a mixed batch must not use up the hand-out for this largest size
        for size in self._padding.sizes_to_prepare(_MAX_PROGRAMS - 1):
            geometries = spec.geometries[:1] * size
            capacity, prefix = self._sizes.setdefault((spec.output, geometries), (spec.payload_capacity, spec.prefix))
            ahead = replace(spec, batch=size, geometries=geometries, payload_capacity=capacity,
                            prefix=min(prefix, capacity))
            if ahead in self._programs:
                continue
            program = self._program(ahead)
            program.clear(threshold)
            self._graphs.prepare(ahead, lambda: (program.enqueue, program), binding=program)

    def _execute(self, program: PostprocessProgram, fmt: str) -> Optional[List[FrameDetections]]:
        """Run the device program (graph replay when captured) and decode its host copies."""
        graphed = self._graphs is not None and self._graphs.run(
            program.spec, lambda: (program.enqueue, program), binding=program) is not None
        if not graphed:
            program.enqueue()
        if self._stream is not None:
            self._record_event().synchronize()  # the one wait of the batch
        return program.finish(mask_pool=self._mask_pool)

    # ------------------------------------------------------------------ programs and graphs

    def _program(self, spec: ProgramSpec) -> PostprocessProgram:
        program = self._programs.get(spec)
        if program is None:
            program = PostprocessProgram(spec, self.device, self.num_classes, self._class_mapping)
            self._programs.put(spec, program)
        return program

    def _drop_graph(self, spec: ProgramSpec, _program: PostprocessProgram) -> None:
        if self._graphs is not None:
            self._graphs.discard(spec)  # its buffers go with the program

    def last_graph(self) -> Optional[Tuple[CapturedGraph, Any]]:
        """(graph, stream) of the most recent call when it was captured (benchmarks time it)."""
        graph = self._graphs.peek(self._last_spec) if self._graphs is not None and self._last_spec else None
        return (graph, self._stream) if graph is not None else None

    def _record_event(self):
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._stream)
        return event


def _has_exact_score_ties(logits: torch.Tensor, threshold, columns: torch.Tensor) -> bool:
    """Whether two sigmoid scores above the (lowest) threshold in logit ``columns`` (the ones
    that can become detections) are equal in some frame."""
    lowest = float(threshold.min()) if isinstance(threshold, torch.Tensor) else float(threshold)
    scores = torch.sigmoid(logits[..., columns].float()).flatten(1)
    for row in scores:
        above = row[row > lowest]
        if above.numel() > 1 and torch.unique(above).numel() < above.numel():
            return True
    return False



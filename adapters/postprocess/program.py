"""The fused postprocess as one fixed-shape device program plus a host half.

:meth:`PostprocessProgram.enqueue` queues everything the device does for a batch -
selection, mask extents or RLE transition counts, their prefix sums, bit-packed crops or
compressed COCO RLE strings, and the copies of a header and of a payload *prefix* into pinned
host buffers - with shapes fixed by a :class:`ProgramSpec` and no host read in between.
That makes it capturable in one CUDA graph (the stage replays it per frame) and leaves
the host one wait per batch. :meth:`PostprocessProgram.finish` then decodes the host
copies; only a payload longer than the prefix costs a second copy, and one longer than
the device buffer is reported so the stage can size up and run again.

Grids cover ``capacity`` detections; programs past a frame's detection count (read on
the device) return at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from inference_fastpath.adapters.contracts import FrameDetections, RawOutputs
from inference_fastpath.adapters.postprocess.compact import LazyCompactMasks
from inference_fastpath.kernels.mask_resize import binarize_with_torch, make_mask_plan
from inference_fastpath.kernels.postprocess_mask_dense import (
    device_crop_layout,
    extent_bands,
    launch_dense_pack,
    launch_extents,
    paste_crops,
    reduce_extents,
)
from inference_fastpath.kernels.postprocess_mask_rle import (
    launch_rle_count,
    launch_rle_emit,
)
from inference_fastpath.kernels.postprocess_rle_string import launch_rle_strings
from inference_fastpath.kernels.frame_geometry import FrameGeometry, geometry_params
from inference_fastpath.kernels.postprocess_select import (
    HEADER_WORDS,
    ROW_WORDS,
    FrameSelection,
    decode_selection,
    select_detections,
    selection_capacity,
)

DENSE = "dense"
STRINGS = "strings"  # compressed COCO RLE strings (bytes) plus their transition positions: the RLE output
RUNS = "runs"  # int32 transition positions alone: the compact output
LAYOUT_WORDS = 5  # [offset, y0, first_byte, rows, bytes] of one dense crop
_NO_SCORE = torch.finfo(torch.float32).min  # a logit whose score (sigmoid: 0) passes no threshold >= 0


@dataclass(frozen=True)
class ProgramSpec:
    """Everything that fixes a program's shapes and kernel arguments (a CUDA-graph key)."""

    batch: int
    queries: int
    classes: int
    mask_hw: Tuple[int, int]
    mask_dtype: torch.dtype
    geometries: Tuple[FrameGeometry, ...]
    output: str  # DENSE, STRINGS or RUNS
    max_detections: Optional[int]
    threshold: float  # the scalar threshold (float32 value); unused when per_class_len > 0
    per_class_len: int  # length of the per-class threshold table, 0 for a scalar threshold
    payload_capacity: int  # elements of the device payload (RUNS: int32 positions, else bytes)
    prefix: int  # payload elements copied to the host with the header
    acc_mode: int

    @property
    def capacity(self) -> int:
        return selection_capacity(self.queries, self.max_detections)

    @property
    def payload_dtype(self) -> torch.dtype:
        return torch.int32 if self.output == RUNS else torch.uint8


class PostprocessProgram:
    """Static inputs, device scratch and pinned host buffers of one :class:`ProgramSpec`."""

    def __init__(
        self,
        spec: ProgramSpec,
        device: torch.device,
        num_classes: int,
        class_mapping: Optional[torch.Tensor],
    ) -> None:
        self.spec = spec
        self.device = device
        self.num_classes = num_classes
        self.class_mapping = class_mapping
        b, q, c = spec.batch, spec.queries, spec.classes
        mh, mw = spec.mask_hw
        self.logits = torch.zeros((b, q, c), dtype=torch.float32, device=device)
        self.boxes = torch.zeros((b, q, 4), dtype=torch.float32, device=device)
        self.masks = torch.zeros((b, q, mh, mw), dtype=spec.mask_dtype, device=device)
        self.thresholds = (
            torch.zeros(spec.per_class_len, dtype=torch.float32, device=device) if spec.per_class_len else None
        )
        self.plans = [make_mask_plan(g, mh, mw, device) for g in spec.geometries]
        self.params = torch.from_numpy(geometry_params(spec.geometries)).to(device)
        cap = spec.capacity
        self.selection_words = HEADER_WORDS + cap * ROW_WORDS
        extra = cap * {DENSE: LAYOUT_WORDS, STRINGS: 2, RUNS: 1}[spec.output]
        self.payload = torch.empty(spec.payload_capacity, dtype=spec.payload_dtype, device=device)
        # STRINGS: the positions behind the strings. Every run count takes >= 1 byte, so when
        # the strings fit the payload, the positions fit a buffer of as many elements.
        self.positions = (
            torch.empty(spec.payload_capacity, dtype=torch.int32, device=device)
            if spec.output == STRINGS else self.payload
        )
        pin = device.type == "cuda"
        self.host_header = torch.empty(b * (self.selection_words + extra), dtype=torch.int32, pin_memory=pin)
        self.host_prefix = torch.empty(spec.prefix, dtype=spec.payload_dtype, pin_memory=pin)
        # STRINGS: the positions travel too (the compact masks beside the COCO strings)
        self.host_positions = (
            torch.empty(spec.prefix, dtype=torch.int32, pin_memory=pin) if spec.output == STRINGS else None
        )
        widths = [p.canvas[1] for p in self.plans]
        self.row_widths = torch.tensor(np.repeat(widths, cap), dtype=torch.int64, device=device)
        # per detection row (frame-major): its first column in the per-column RLE arrays, H * W,
        # and its index within the frame (compared with the frame's detection count on device)
        column_starts = np.concatenate([[0], np.cumsum([cap * w for w in widths])[:-1]]).astype(np.int64)
        self.row_first_column = torch.from_numpy(
            np.concatenate([start + np.arange(cap) * w for start, w in zip(column_starts, widths)]).astype(np.int64)
        ).to(device)
        self.row_pixels = torch.tensor(
            np.repeat([p.canvas[0] * p.canvas[1] for p in self.plans], cap), dtype=torch.int64, device=device
        )
        self.row_index = torch.arange(cap, dtype=torch.int32, device=device).repeat(b)
        self.payload_total = 0  # set by finish(): payload elements the last run produced
        self.rows = spec.batch  # frames of the last load (fewer than the batch in a padded program)

    # ------------------------------------------------------------------ device half

    def load(self, raw: RawOutputs, threshold: Union[float, torch.Tensor]) -> None:
        """Copy the engine outputs (and a per-class threshold table) into the static inputs.

        ``raw`` may hold fewer frames than the program (a partial batch in a padded program): the
        rows past them get logits whose score is 0, so they select nothing under a threshold >= 0,
        and :meth:`finish` decodes only the loaded frames in any case.
        """
        rows = int(raw.logits.shape[0])
        if rows > self.spec.batch:
            raise ValueError(f"{rows} frames do not fit a program of batch {self.spec.batch}")
        self.rows = rows
        self.logits[:rows].copy_(raw.logits, non_blocking=True)
        self.boxes[:rows].copy_(raw.boxes, non_blocking=True)
        self.masks[:rows].copy_(raw.masks, non_blocking=True)
        if rows < self.spec.batch:
            self.logits[rows:].fill_(_NO_SCORE)
        self._load_thresholds(threshold)

    def clear(self, threshold: Union[float, torch.Tensor]) -> None:
        """Static inputs of a batch with no frames (every score 0, so nothing is selected): what a
        capture ahead of need runs before any frame of this size has come."""
        self.rows = 0
        self.logits.fill_(_NO_SCORE)
        self.boxes.zero_()
        self.masks.zero_()
        self._load_thresholds(threshold)

    def _load_thresholds(self, threshold: Union[float, torch.Tensor]) -> None:
        if self.thresholds is not None:
            table = torch.as_tensor(threshold, dtype=torch.float32).reshape(-1)
            self.thresholds.copy_(table[: self.spec.per_class_len], non_blocking=True)

    def load_from(self, other: "PostprocessProgram") -> None:
        """Same inputs as another program (used when a run has to be repeated with more room)."""
        self.rows = other.rows
        self.logits.copy_(other.logits)
        self.boxes.copy_(other.boxes)
        self.masks.copy_(other.masks)
        if self.thresholds is not None and other.thresholds is not None:
            self.thresholds.copy_(other.thresholds)

    def enqueue(self) -> Tuple[torch.Tensor, ...]:
        """Queue the whole device side; reads nothing back. Returns the device tensors it made."""
        spec = self.spec
        selection = select_detections(
            self.logits,
            self.boxes,
            spec.geometries,
            self.thresholds if self.thresholds is not None else spec.threshold,
            self.num_classes,
            self.class_mapping,
            spec.max_detections,
            params=self.params,
        )
        queries = selection.queries_device()
        bins = [
            binarize_with_torch(self.masks[b], queries[b], plan) if plan.binary_source else None
            for b, plan in enumerate(self.plans)
        ]
        if spec.output == DENSE:
            extra = self._enqueue_dense(selection, bins)
        else:
            extra = self._enqueue_rle(selection, bins)
        header = torch.cat([selection.packed.reshape(-1), extra.reshape(-1)])
        self.host_header.copy_(header, non_blocking=True)
        self.host_prefix.copy_(self.payload[: spec.prefix], non_blocking=True)
        if self.host_positions is not None:
            self.host_positions.copy_(self.positions[: spec.prefix], non_blocking=True)
        return selection.packed, header

    def _enqueue_rle(self, selection, bins) -> torch.Tensor:
        cap, mode = self.spec.capacity, self.spec.acc_mode
        widths = [p.canvas[1] for p in self.plans]
        starts = np.concatenate([[0], np.cumsum([cap * w for w in widths])]).astype(int)
        counts = torch.zeros(int(starts[-1]), dtype=torch.int32, device=self.device)
        for b, plan in enumerate(self.plans):
            view = counts[starts[b] : starts[b + 1]].view(cap, widths[b])
            launch_rle_count(self.masks[b], bins[b], selection.packed[b], cap, plan, view, mode)
        counts64 = counts.to(torch.int64)
        offsets = torch.cumsum(counts64, 0) - counts64  # rows past n_out counted 0: no gaps
        for b, plan in enumerate(self.plans):
            view = offsets[starts[b] : starts[b + 1]].view(cap, widths[b])
            launch_rle_emit(self.masks[b], bins[b], selection.packed[b], cap, plan, view, self.positions, mode)
        per_row = torch.cat(
            [counts[starts[b] : starts[b + 1]].view(cap, widths[b]).sum(1, dtype=torch.int32) for b in range(len(widths))]
        )
        if self.spec.output == RUNS:
            return per_row
        # one compressed COCO string per live row, coded from the positions
        live = self.row_index.view(-1, cap) < selection.packed[:, :1]
        slots = torch.where(live.reshape(-1), per_row + 1, 0).to(torch.int32)
        row_bytes = torch.empty(slots.numel(), dtype=torch.int64, device=self.device)
        launch_rle_strings(self.positions, offsets[self.row_first_column], slots, self.row_pixels,
                           self.payload, row_bytes)
        return torch.cat([row_bytes.to(torch.int32), per_row])

    def _enqueue_dense(self, selection, bins) -> torch.Tensor:
        cap, mode = self.spec.capacity, self.spec.acc_mode
        extents = []
        for b, plan in enumerate(self.plans):
            per_band = torch.empty((cap, extent_bands(plan)[0], 4), dtype=torch.int32, device=self.device)
            launch_extents(self.masks[b], bins[b], selection.packed[b], cap, plan, per_band, mode)
            extents.append(reduce_extents(per_band))
        crops = device_crop_layout(torch.cat(extents), self.row_widths)
        for b, plan in enumerate(self.plans):
            rows = crops[b * cap : (b + 1) * cap]
            launch_dense_pack(self.masks[b], bins[b], selection.packed[b], cap, rows, plan, self.payload, mode)
        return crops

    # ------------------------------------------------------------------ host half

    def finish(self, mask_pool=None) -> Optional[List[FrameDetections]]:
        """Decode the host copies (the device work must have completed).

        Returns None when the payload did not fit the device buffer (``payload_total`` says how much
        room the run needed). DENSE masks go into buffers from ``mask_pool`` (a
        :class:`MaskBufferPool`) when given; STRINGS become COCO RLE dicts by slicing, with their
        compact masks beside them; RUNS become compact masks (``compact.py``).
        """
        spec = self.spec
        cap, batch = spec.capacity, spec.batch
        header = self.host_header.numpy()
        n_sel = batch * self.selection_words
        frames = decode_selection(header[:n_sel].reshape(batch, self.selection_words), cap)
        counts = [len(f.confidence) for f in frames]
        extra = header[n_sel:]
        if spec.output == DENSE:
            layout = extra.reshape(batch, cap, LAYOUT_WORDS).astype(np.int64)
            sizes = [layout[b, :n, 3] * layout[b, :n, 4] for b, n in enumerate(counts)]
        elif spec.output == STRINGS:
            sizes = [s[:n] for s, n in zip(extra[: batch * cap].reshape(batch, cap).astype(np.int64), counts)]
            runs = [r[:n] for r, n in zip(extra[batch * cap:].reshape(batch, cap).astype(np.int64), counts)]
        else:
            sizes = runs = [r[:n] for r, n in zip(extra.reshape(batch, cap).astype(np.int64), counts)]
        self.payload_total = total = int(sum(int(s.sum()) for s in sizes))
        if total > spec.payload_capacity:
            return None
        payload = self._host_payload(self.host_prefix, self.payload, total)
        positions = payload
        if spec.output == STRINGS:
            positions = self._host_payload(self.host_positions, self.positions,
                                           int(sum(int(r.sum()) for r in runs)))
        if spec.output != DENSE:
            positions = positions.copy()  # the lazy compact masks outlive this pinned buffer, which the next batch refills
        results = []
        cursor = position_cursor = 0
        # the padding frames come last in the payload and selected nothing: decoding stops before them
        for b, (frame, plan, n) in enumerate(zip(frames[: self.rows], self.plans, counts)):
            height, width = plan.canvas
            if spec.output == DENSE:
                out = mask_pool.take(n, height, width) if mask_pool is not None else None
                masks = paste_crops(payload, layout[b, :n], height, width, out=out)
                results.append(_frame_detections(frame, plan.geometry, dense_masks=masks))
                continue
            position_bounds = (position_cursor + np.concatenate([[0], np.cumsum(runs[b])])).tolist()
            position_cursor = position_bounds[-1]
            per_mask = [positions[a:e] for a, e in zip(position_bounds[:-1], position_bounds[1:])]
            compact = LazyCompactMasks(per_mask, height, width)  # worked out only if a later block reads masks
            if spec.output == RUNS:
                results.append(_frame_detections(frame, plan.geometry, compact_masks=compact))
                continue
            bounds = (cursor + np.concatenate([[0], np.cumsum(sizes[b])])).tolist()
            cursor = bounds[-1]
            rles = [{"size": [height, width], "counts": payload[a:e].tobytes()}
                    for a, e in zip(bounds[:-1], bounds[1:])]
            results.append(_frame_detections(frame, plan.geometry, rle_masks=rles, compact_masks=compact))
        return results

    @staticmethod
    def _host_payload(host: torch.Tensor, device: torch.Tensor, total: int) -> np.ndarray:
        prefix = host.numel()
        if total <= prefix:
            return host[:total].numpy()
        # rare: more than the prefix; a blocking copy of the rest on the current stream
        rest = device[prefix:total].to("cpu")
        return np.concatenate([host.numpy(), rest.numpy()])



def _frame_detections(frame: FrameSelection, geometry: FrameGeometry, **masks) -> FrameDetections:
    return FrameDetections(
        xyxy=frame.xyxy.astype(np.float32, copy=False),
        confidence=frame.confidence.astype(np.float32, copy=False),
        class_id=frame.class_id.astype(np.int64, copy=False),
        image_size=(geometry.image_h, geometry.image_w),
        **masks,
    )


def grown(size: int, needed: int, limit: int) -> int:
    """A buffer size >= ``needed`` (power of two, at least ``size``), at most ``limit``."""
    target = max(size, 1 << max(0, int(needed - 1).bit_length()))
    return min(max(target, needed), max(limit, needed))


def spec_for(
    raw: RawOutputs,
    geometries: Sequence[FrameGeometry],
    output: str,
    max_detections: Optional[int],
    threshold: Union[float, torch.Tensor],
    payload_capacity: int,
    prefix: int,
    acc_mode: int,
    batch: Optional[int] = None,
) -> ProgramSpec:
    """The spec of a program for ``raw``; ``batch``: its frames when padded above ``raw``'s (then
    ``geometries`` has one per padded frame)."""
    b, q, c = (int(s) for s in raw.logits.shape)
    b = b if batch is None else int(batch)
    per_class = isinstance(threshold, torch.Tensor)
    return ProgramSpec(
        batch=b,
        queries=q,
        classes=c,
        mask_hw=(int(raw.masks.shape[-2]), int(raw.masks.shape[-1])),
        mask_dtype=raw.masks.dtype,
        geometries=tuple(geometries),
        output=output,
        max_detections=None if max_detections is None else int(max_detections),
        threshold=0.0 if per_class else float(np.float32(threshold)),
        per_class_len=int(threshold.numel()) if per_class else 0,
        payload_capacity=int(payload_capacity),
        prefix=int(min(prefix, payload_capacity)),
        acc_mode=int(acc_mode),
    )

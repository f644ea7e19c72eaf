"""The engine stage: one network forward from a static input buffer to ``RawOutputs``.

Every engine (torch, TensorRT, ONNX Runtime, the model's own forward) derives from
:class:`EngineBase`, which owns what they have in common:

* **A dedicated CUDA stream.** ``__call__`` makes it wait on ``batch.ready_event`` (or, when the batch
  has none, on the caller's current stream): a stream-to-stream dependency, never a host sync. The
  returned ``RawOutputs.done_event`` is recorded on that stream after the forward.
* **Static input buffers**, one per (batch size, height, width). The preprocess asks for
  :meth:`EngineBase.input_buffer` and writes the normalised batch straight into it; when the batch
  tensor it hands over *is* that buffer (same memory, shape and strides) the engine copies nothing,
  otherwise it copies it in on the engine stream. ``input_buffer`` makes the writer's stream wait for
  the last forward that read the buffer, so a producer may refill it while the engine still runs.
  One buffer per size means one producer at a time; concurrent producers pass their own tensors.
* **Output ownership (``release``).** Outputs of an eager forward are fresh tensors. Outputs of a
  CUDA-graph replay are *borrowed* views of the graph's static output buffers. The policy, for both:
  the consumer calls ``raw.release(event)`` once its reads are enqueued (``event`` recorded on its
  stream after the reads; ``None`` means "my current stream"). The next replay of the same graph
  makes the engine stream wait on that event (GPU-side, no host sync). While a consumer still holds
  a graph's outputs, the next call does not touch them: it replays a second captured instance of
  that graph (``max_inflight`` instances per shape, two by default, enough for a depth-2 pipeline)
  and, when all of them are held, runs eagerly into fresh tensors (logged once). For fresh tensors,
  ``release`` keeps them referenced until the consumer's event completes so the caching allocator
  cannot hand their memory to the engine stream while the consumer still reads it.
  ``output_mode="copy"`` instead clones every output on the engine stream (consumer owns them; the
  graph is immediately reusable) for consumers that will never call ``release``.
* **A lock**: one engine instance may be shared by threads; calls are serialised.

Nothing here is module-level mutable state: streams, buffers, caches and counters live on the
instance.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch

from inference_fastpath.adapters.cuda.streams import stream_made_current
from inference_fastpath.adapters.engine.batch_padding import GRAPH_CACHE_SIZE, BatchPadding
from inference_fastpath.adapters.engine.graphs import (
    CapturedGraph,
    GraphCaptureStats,
    GraphKey,
    GraphCache,
    capture_cuda_graph,
    make_graph_key,
)
from inference_fastpath.adapters.contracts import PreprocessedBatch, RawOutputs

LOGGER = logging.getLogger(__name__)

OutputTriple = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
OUTPUT_MODES = ("borrow", "copy")


@dataclass
class EngineStats:
    """Counters an engine keeps about itself (read them in tests and benchmarks)."""

    calls: int = 0
    graph_replays: int = 0
    eager_runs: int = 0
    captures: int = 0
    evictions: int = 0
    input_copies: int = 0

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def is_same_buffer(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    """True when ``tensor`` is exactly ``buffer`` (same memory, dtype, shape and strides)."""
    return (
        tensor.device == buffer.device
        and tensor.dtype == buffer.dtype
        and tuple(tensor.shape) == tuple(buffer.shape)
        and tensor.stride() == buffer.stride()
        and tensor.data_ptr() == buffer.data_ptr()
    )


def outputs_as_model_results(raw: RawOutputs) -> Dict[str, torch.Tensor]:
    """RawOutputs in the dict form inference-models' ``post_process`` reads."""
    return {"pred_boxes": raw.boxes, "pred_logits": raw.logits, "pred_masks": raw.masks}


def materialize_outputs(raw: RawOutputs) -> OutputTriple:
    """Clones the outputs on the caller's current stream, then releases them.

    Convenience for tests, benchmarks and simple consumers: waits (GPU-side) on ``done_event``,
    copies, and hands the borrowed buffers back with an event recorded after the copies.
    """
    event = None
    if raw.done_event is not None:
        stream = torch.cuda.current_stream(raw.boxes.device)
        stream.wait_event(raw.done_event)
    result = (raw.boxes.clone(), raw.logits.clone(), raw.masks.clone())
    if raw.done_event is not None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(raw.boxes.device))
    if raw.release is not None:
        raw.release(event)
    return result


class EngineBase(GraphCaptureStats, abc.ABC):
    """Shared machinery of every engine; subclasses implement :meth:`_forward` (and graph hooks)."""

    name: str = "engine"
    supports_cuda_graphs: bool = False

    def __init__(
        self,
        *,
        device: torch.device,
        input_hw: Tuple[int, int],
        input_dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = False,
        graph_cache_size: int = GRAPH_CACHE_SIZE,
        max_inflight: int = 2,
        warmup_iters: int = 2,
        output_mode: str = "borrow",
    ) -> None:
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.input_dtype = input_dtype
        self.output_mode = output_mode
        self.graph_cache_size = int(graph_cache_size)
        self.stats = EngineStats()
        self._lock = threading.RLock()
        self._is_cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self._is_cuda else None
        self._capture_stream: Optional["torch.cuda.Stream"] = None  # warm-up + capture, reused
        # (physical batch, h, w) -> full-size static input buffer
        self._input_buffers: Dict[Tuple[int, int, int], torch.Tensor] = {}
        # (physical batch, h, w) -> event after the last forward that read that buffer
        self._input_free_events: Dict[Tuple[int, int, int], Any] = {}
        # fresh outputs a consumer released but whose reads may still be running
        self._parked: Deque[Tuple[Any, Tuple[torch.Tensor, ...]]] = deque()
        self._parked_lock = threading.Lock()  # consumers release without waiting for a running call
        self._warmup_iters = max(1, int(warmup_iters))
        self._padding = BatchPadding()
        self.cuda_graphs_requested = bool(cuda_graphs)
        self.cuda_graphs_unavailable_reason: Optional[str] = None
        self._graphs: Optional[GraphCache] = None
        if cuda_graphs:
            reason = self._cuda_graphs_unavailable()
            if reason is None:
                self._graphs = self._graph_cache(graph_cache_size, max_inflight)
            else:
                self.cuda_graphs_unavailable_reason = reason
                LOGGER.warning("%s engine: CUDA graphs off, running eager: %s", self.name, reason)

    # ------------------------------------------------------------------ subclass hooks

    @abc.abstractmethod
    def _forward(self, x: torch.Tensor) -> OutputTriple:
        """Eager forward of a device tensor of the physical batch size, on the current stream.

        Returns (boxes, logits, masks) as freshly allocated tensors.
        """

    def _graph_forward_fn(
        self, key: GraphKey, static_input: torch.Tensor
    ) -> Tuple[Callable[[], Sequence[torch.Tensor]], Any]:
        """The callable a CUDA graph captures for ``key``, and anything it must keep alive."""
        return (lambda: self._forward(static_input)), None

    def _graph_unsupported_reason(self, key: GraphKey) -> Optional[str]:
        """A reason why ``key`` cannot be captured (e.g. outside a TensorRT profile), else None."""
        return None

    def _physical_batch(self, batch_size: int) -> int:
        """Rows the model actually runs for a batch; called with the lock held.

        With graphs on, partial batches are padded to a few sizes (:class:`BatchPadding`), so
        changing sizes replay a handful of graphs instead of capturing one per size. The padded
        rows hold whatever the static buffer held; each image is computed on its own in the network,
        and only the first ``batch_size`` rows of the outputs are handed on. The largest batch seen
        never shrinks: after a source leaves, batches still run at the old size. ``input_buffer(n)``
        and the call that follows agree as long as no larger batch comes between them (the runner
        holds its launch lock across both; otherwise the call copies the input once). TensorRT pads to
        its profile instead.
        """
        return self._padding(batch_size) if self.cuda_graphs_active else batch_size

    def _cuda_graphs_unavailable(self) -> Optional[str]:
        if not self.supports_cuda_graphs:
            return f"the {self.name} engine does not capture CUDA graphs"
        if not self._is_cuda:
            return f"CUDA graphs need a CUDA device, the engine runs on {self.device}"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None

    # ------------------------------------------------------------------ public API

    @property
    def stream(self) -> Optional["torch.cuda.Stream"]:
        """The engine's dedicated CUDA stream (None on the CPU)."""
        return self._stream

    @property
    def cuda_graphs_active(self) -> bool:
        return self._graphs is not None and self._graphs.disabled_reason is None

    @property
    def graph_fallback_reason(self) -> Optional[str]:
        """Why graphs are not (or no longer) used: unavailable at start or disabled after a failure."""
        if self.cuda_graphs_unavailable_reason is not None:
            return self.cuda_graphs_unavailable_reason
        if self._graphs is not None:
            return self._graphs.disabled_reason
        return None

    def cached_graph_keys(self) -> List[GraphKey]:
        return [] if self._graphs is None else self._graphs.keys()

    def input_buffer(
        self,
        batch_size: int,
        height: Optional[int] = None,
        width: Optional[int] = None,
        stream: Optional["torch.cuda.Stream"] = None,
    ) -> torch.Tensor:
        """The static (batch, 3, H, W) input tensor the preprocess should write into.

        Write it on ``stream`` (default: the caller's current stream): that stream is made to
        wait until the engine's last forward that read this buffer is done. Pass the returned
        tensor itself as ``PreprocessedBatch.tensor`` to skip the engine-side copy.
        """
        h = self.input_hw[0] if height is None else int(height)
        w = self.input_hw[1] if width is None else int(width)
        with self._lock:
            phys = self._physical_batch(batch_size)
            full = self._full_input_buffer(phys, h, w)
            if self._is_cuda:
                event = self._input_free_events.get((phys, h, w))
                if event is not None:
                    (stream or torch.cuda.current_stream(self.device)).wait_event(event)
            return full[:batch_size]

    def __call__(self, batch: PreprocessedBatch) -> RawOutputs:
        x = batch.tensor
        if x.dim() != 4:
            raise ValueError(f"{self.name} engine expects a (N, C, H, W) batch, got {tuple(x.shape)}")
        with self._lock:
            self.stats.calls += 1
            if not self._is_cuda:
                return self._call_on_cpu(x)
            self._reap_parked()
            stream = self._stream
            if batch.ready_event is not None:
                stream.wait_event(batch.ready_event)
            else:
                stream.wait_stream(torch.cuda.current_stream(self.device))
            with stream_made_current(stream):
                boxes, logits, masks, release, buffer_key = self._run_on_stream(x, stream)
                done = torch.cuda.Event()
                done.record(stream)
                if buffer_key is not None:
                    self._input_free_events[buffer_key] = done
                    # after `done`: the outputs handed on do not wait for these captures
                    self._capture_padded_sizes(tuple(x.shape[1:]))
            return RawOutputs(boxes=boxes, logits=logits, masks=masks, done_event=done, release=release)

    def close(self) -> None:
        """Frees captured graphs, buffers and parked outputs (the engine stays usable)."""
        with self._lock:
            if self._stream is not None:
                self._stream.synchronize()
            if self._graphs is not None:
                self._graphs.clear()
            self._input_buffers.clear()
            self._input_free_events.clear()
            with self._parked_lock:
                self._parked.clear()

    def describe(self) -> Dict[str, Any]:
        return {
            "engine": self.name,
            "device": str(self.device),
            "cuda_graphs": self.cuda_graphs_active,
            "graph_fallback_reason": self.graph_fallback_reason,
            "output_mode": self.output_mode,
            "graph_cache_size": self.graph_cache_size,
            "stats": self.stats.as_dict(),
        }

    # ------------------------------------------------------------------ internals

    def _call_on_cpu(self, x: torch.Tensor) -> RawOutputs:
        n = x.shape[0]
        if x.device != self.device:
            x = x.to(self.device)
            self.stats.input_copies += 1
        boxes, logits, masks = self._run_eager(x, n)
        return RawOutputs(boxes=boxes, logits=logits, masks=masks, done_event=None, release=_noop_release())

    def _run_on_stream(self, x: torch.Tensor, stream: "torch.cuda.Stream"):
        n, _, h, w = x.shape
        phys = self._physical_batch(n)
        key = make_graph_key(phys, tuple(x.shape[1:]), self.input_dtype)
        use_graph = self._graphs is not None and self._graphs.disabled_reason is None
        if use_graph:
            unsupported = self._graph_unsupported_reason(key)
            if unsupported is not None:
                self._graphs.note_fallback(unsupported)
                use_graph = False
        if use_graph:
            full = self._full_input_buffer(phys, h, w)
            view = full[:n]
            if not is_same_buffer(x, view):
                view.copy_(x, non_blocking=True)
                if x.is_cuda:
                    _record_stream(x, stream)  # read here, possibly allocated on another stream
                self.stats.input_copies += 1
            run = self._graphs.run(key, lambda: self._graph_forward_fn(key, full), binding=full)
            if run is not None:
                self.stats.graph_replays += 1
                outs = tuple(o[:n] if o.shape[0] != n else o for o in run.outputs)
                if self.output_mode == "copy" or any(o.dtype != torch.float32 for o in outs):
                    # Owned copies (float32 as the contract wants), enqueued before any later replay.
                    outs = tuple(o.float() if o.dtype != torch.float32 else o.clone() for o in outs)
                    run.release(None)  # the clones are enqueued on this stream before any replay
                    return (*outs, self._parking_release(outs), (phys, h, w))
                return (*outs, run.release, (phys, h, w))
            src = view  # graph refused (all instances held / capture failed): eager on the buffer
            buffer_key = (phys, h, w)
        else:
            src, buffer_key = x, None
            if src.device != self.device:
                src = src.to(self.device, non_blocking=True)
                self.stats.input_copies += 1
            elif src.is_cuda:
                _record_stream(src, stream)
        outs = self._run_eager(src, n)
        return (*outs, self._parking_release(outs), buffer_key)

    def _capture_padded_sizes(self, sample_shape: Tuple[int, ...]) -> None:
        """Captures the graphs of the smaller padded batch sizes once the largest batch has held
        (:meth:`BatchPadding.sizes_to_prepare`), so partial batches later (a clip's sources ending,
        a camera stalling) replay instead of capturing mid-stream. Only the newest sizes that fit
        the cache beside the largest are captured."""
        if not self.cuda_graphs_active:
            return
        _, h, w = sample_shape
        for size in self._padding.sizes_to_prepare(self.graph_cache_size - 1):
            key = make_graph_key(size, sample_shape, self.input_dtype)
            if self._graph_unsupported_reason(key) is not None:
                continue
            full = self._full_input_buffer(size, h, w)
            if self._graphs.prepare(key, lambda: self._graph_forward_fn(key, full), binding=full):
                self._input_free_events[(size, h, w)] = self._record_on_current_stream()

    def _run_eager(self, x: torch.Tensor, n: int) -> OutputTriple:
        """Eager forward with batch chunking / padding as the model's batch limits require."""
        self.stats.eager_runs += 1
        chunks = self._batch_chunks(n)
        if len(chunks) == 1 and chunks[0] == (0, n, n):
            return _as_float_triple(self._forward(_to_dtype(x, self.input_dtype)))
        parts: List[OutputTriple] = []
        for start, stop, run in chunks:
            piece = _to_dtype(x[start:stop], self.input_dtype)
            if run > stop - start:
                pad = piece.new_zeros((run - (stop - start),) + tuple(piece.shape[1:]))
                piece = torch.cat([piece, pad], dim=0)
            outs = self._forward(piece.contiguous())
            parts.append(tuple(o[: stop - start] for o in outs))
        return _as_float_triple(tuple(torch.cat(p, dim=0) for p in zip(*parts)))

    def _batch_chunks(self, n: int) -> List[Tuple[int, int, int]]:
        return [(0, n, n)]

    def _full_input_buffer(self, phys: int, h: int, w: int) -> torch.Tensor:
        key = (phys, h, w)
        buf = self._input_buffers.get(key)
        if buf is None:
            buf = torch.zeros((phys, 3, h, w), dtype=self.input_dtype, device=self.device)
            if self._is_cuda:
                _record_stream(buf, self._stream)  # may be allocated on a producer's stream
            self._input_buffers[key] = buf
        return buf

    def _graph_cache(self, capacity: int, max_inflight: int) -> GraphCache:
        return GraphCache(
            f"{self.name} engine",
            capture=self._capture_graph,
            capacity=capacity,
            max_inflight=max_inflight,
            consumers_hold=True,
            wait_event=self._stream.wait_event,
            record_event=self._record_on_current_stream,
            before_evict=self._before_graph_eviction,
            stats=self.stats,
        )

    def _capture_graph(self, fn: Callable[[], Sequence[torch.Tensor]], keepalive: Any) -> CapturedGraph:
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(device=self.device)
        return capture_cuda_graph(
            fn,
            device=self.device,
            warmup_iters=self._warmup_iters,
            keepalive=keepalive,
            stream=self._capture_stream,
        )

    def _before_graph_eviction(self, key: GraphKey) -> None:
        # A replay of the evicted graph may still be queued: let it finish before freeing it.
        if self._stream is not None:
            self._stream.synchronize()

    def _record_on_current_stream(self):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _parking_release(self, tensors: Tuple[torch.Tensor, ...]) -> Callable[..., None]:
        """Release for fresh outputs: keep them alive until the consumer's reads complete."""
        state = {"done": False}

        def release(event: Optional[Any] = None) -> None:
            if state["done"]:
                return
            state["done"] = True
            if not self._is_cuda:
                return
            if event is None:
                event = self._record_on_current_stream()
            with self._parked_lock:
                self._parked.append((event, tensors))

        return release

    def _reap_parked(self) -> None:
        with self._parked_lock:
            while self._parked and self._parked[0][0].query():
                self._parked.popleft()


def model_input_hw(model: Any, default: Tuple[int, int] = (312, 312)) -> Tuple[int, int]:
    """Network input (height, width) of an inference-models model, from its inference config."""
    config = getattr(model, "_inference_config", None)
    try:
        size = config.network_input.training_input_size
        return int(size.height), int(size.width)
    except AttributeError:
        pass
    resolution = getattr(model, "_resolution", None)
    if resolution is not None:
        return int(resolution), int(resolution)
    return default


def _record_stream(tensor: torch.Tensor, stream: Any) -> None:
    """Tells the caching allocator ``tensor`` is used on ``stream``; a no-op for memory it does not
    own (e.g. a DLPack frame from a decoder), whose lifetime the producer manages."""
    try:
        tensor.record_stream(stream)
    except RuntimeError:
        pass


def _noop_release() -> Callable[..., None]:
    def release(event: Optional[Any] = None) -> None:
        return None

    return release


def _to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _as_float_triple(outs: Sequence[torch.Tensor]) -> OutputTriple:
    boxes, logits, masks = outs
    return tuple(o if o.dtype == torch.float32 else o.float() for o in (boxes, logits, masks))  # type: ignore[return-value]

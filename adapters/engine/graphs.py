"""CUDA-graph capture and replay, shared by the torch and TensorRT engines.

Two layers:

* :func:`capture_cuda_graph` - the CUDA part: warm-up iterations of a callable on a side stream
  (lazy initialisations such as cuBLAS handles, TensorRT's deferred updates or our geometry caches
  happen there, outside the capture), then one capture into a fresh private memory pool with
  ``capture_error_mode="thread_local"`` so other threads' CUDA calls (another engine running eagerly,
  allocations) neither fail nor break this capture. A failed capture is always ended so the stream
  never stays in capture mode.
* :class:`GraphRunner` - pure bookkeeping, testable without a GPU: a bounded LRU of captured graphs
  keyed by (batch size, input shape, dtype); per key up to ``max_inflight`` graph *instances*, each
  with its own output buffers and pool, so a consumer may still hold one instance's outputs while
  the next call replays another (see ``base.py`` for the ``release`` policy). Eviction drops the
  graphs, their outputs and their pool references. When capture is impossible the runner says why,
  once per reason, and the caller runs eagerly; a capture error disables graphs for that runner.

Instances of one key do not share a memory pool on purpose: a graph captured later into a shared
pool may place its *live outputs* in blocks that an earlier graph uses as scratch, so replaying the
earlier graph while the later one's outputs are held would overwrite them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from inference_fastpath.adapters.caches import LRUCache

LOGGER = logging.getLogger(__name__)

GraphKey = Tuple[int, Tuple[int, ...], str]  # (batch size, per-sample input shape, dtype name)


def make_graph_key(batch_size: int, sample_shape: Sequence[int], dtype: torch.dtype) -> GraphKey:
    """Key of one captured graph: batch size, per-sample input shape and input dtype."""
    return (int(batch_size), tuple(int(s) for s in sample_shape), str(dtype).replace("torch.", ""))


@dataclass
class CapturedGraph:
    """One captured graph instance: ``replay()`` refills ``outputs`` from the static input."""

    replay: Callable[[], None]
    outputs: Tuple[torch.Tensor, ...]
    keepalive: Any = None  # e.g. the TensorRT execution context the graph's addresses point into
    free: Optional[Callable[[], None]] = None


@dataclass
class _Instance:
    graph: CapturedGraph
    held: bool = False
    generation: int = 0
    free_event: Any = None  # the consumer's release event; the next replay waits on it


@dataclass
class _Entry:
    key: GraphKey
    static_input: torch.Tensor
    instances: List[_Instance] = field(default_factory=list)


@dataclass
class GraphRun:
    outputs: Tuple[torch.Tensor, ...]
    release: Callable[..., None]
    instance: int


class GraphRunner:
    """Decides graph replay vs. eager for one engine and owns its captured graphs.

    ``capture(key, static_input)`` captures one instance. ``wait_event(event)`` makes the engine
    stream wait on an event; ``record_event()`` records one on the caller's current stream (used
    when a consumer releases without an event). Call :meth:`run` on the engine stream with the
    engine lock held; ``release`` callables may be called from any thread.
    """

    def __init__(
        self,
        *,
        capture: Callable[[GraphKey, torch.Tensor], CapturedGraph],
        capacity: int = 4,
        max_inflight: int = 2,
        wait_event: Callable[[Any], None],
        record_event: Callable[[], Any],
        before_evict: Optional[Callable[[GraphKey], None]] = None,
        stats: Any = None,
        name: str = "engine",
        logger: logging.Logger = LOGGER,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self._capture = capture
        self._wait_event = wait_event
        self._record_event = record_event
        self._before_evict = before_evict
        self._stats = stats
        self._name = name
        self._logger = logger
        self.max_inflight = int(max_inflight)
        self.disabled_reason: Optional[str] = None
        self._logged: set = set()
        self._lock = threading.RLock()  # guards instance state against releases from other threads
        self._cache: LRUCache[GraphKey, _Entry] = LRUCache(capacity, on_evict=self._evict)

    # ------------------------------------------------------------------ public

    def run(self, key: GraphKey, static_input: torch.Tensor) -> Optional[GraphRun]:
        """Replays a graph for ``key`` (capturing it first if needed); None means "run eagerly"."""
        with self._lock:
            if self.disabled_reason is not None:
                self.note_fallback(self.disabled_reason)
                return None
            entry = self._cache.get(key)
            if entry is not None and entry.static_input is not static_input:
                self._cache.pop(key)  # the engine replaced its input buffer: recapture
                entry = None
            if entry is None:
                entry = _Entry(key=key, static_input=static_input)
                self._cache.put(key, entry)
            inst = next((i for i in entry.instances if not i.held), None)
            if inst is None:
                if len(entry.instances) >= self.max_inflight:
                    self.note_fallback(
                        f"all {self.max_inflight} graph instances for {key} are still held by "
                        "consumers (release() not called yet): running eager for this call"
                    )
                    return None
                try:
                    graph = self._capture(key, static_input)
                except Exception as error:  # capture is an optimisation: never fail the call
                    self.disable(f"CUDA graph capture failed for {key}: {error!r}")
                    if not entry.instances:
                        self._cache.pop(key, notify=False)
                    return None
                if self._stats is not None:
                    self._stats.captures += 1
                inst = _Instance(graph=graph)
                entry.instances.append(inst)
            if inst.free_event is not None:
                self._wait_event(inst.free_event)
                inst.free_event = None
            inst.graph.replay()
            inst.held = True
            inst.generation += 1
            index = entry.instances.index(inst)
            return GraphRun(
                outputs=inst.graph.outputs,
                release=self._make_release(inst, inst.generation),
                instance=index,
            )

    def note_fallback(self, reason: str) -> None:
        """Logs a fallback-to-eager reason, once per distinct reason."""
        if reason not in self._logged:
            self._logged.add(reason)
            self._logger.warning("%s engine: %s", self._name, reason)

    def disable(self, reason: str) -> None:
        self.disabled_reason = reason
        self.note_fallback(reason)

    def keys(self) -> List[GraphKey]:
        with self._lock:
            return self._cache.keys()

    def instances(self, key: GraphKey) -> int:
        with self._lock:
            entry = self._cache.get(key)
            return 0 if entry is None else len(entry.instances)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)

    # ------------------------------------------------------------------ internals

    def _make_release(self, inst: _Instance, generation: int) -> Callable[..., None]:
        def release(event: Optional[Any] = None) -> None:
            with self._lock:
                # A stale or repeated release (instance re-replayed or evicted since) is a no-op.
                if not inst.held or inst.generation != generation:
                    return
                inst.free_event = event if event is not None else self._record_event()
                inst.held = False

        return release

    def _evict(self, key: GraphKey, entry: _Entry) -> None:
        if self._before_evict is not None:
            self._before_evict(key)
        for inst in entry.instances:
            if inst.graph.free is not None:
                inst.graph.free()
            # Held outputs stay valid: the consumer's references keep their storage alive.
            inst.held = False
            inst.generation += 1
        entry.instances.clear()
        if self._stats is not None:
            self._stats.evictions += 1


def capture_cuda_graph(
    fn: Callable[[], Sequence[torch.Tensor]],
    *,
    device: torch.device,
    warmup_iters: int = 2,
    keepalive: Any = None,
    capture_error_mode: str = "thread_local",
    stream: Optional["torch.cuda.Stream"] = None,
) -> CapturedGraph:
    """Warms ``fn`` up on a side stream, then captures one call of it into a new private pool.

    ``fn`` must read only static tensors and return the tensors it produces; those become the
    graph's static outputs. Replay happens on whatever stream is current when ``replay()`` runs.
    Pass the same side ``stream`` for every capture of an engine: libraries keep per-stream state
    (PyTorch caches a cuBLAS workspace per handle and stream), so a fresh stream per capture would
    grow memory with every recapture.
    """
    caller = torch.cuda.current_stream(device)
    side = stream if stream is not None else torch.cuda.Stream(device=device)
    side.wait_stream(caller)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.cuda.stream(side):
        with torch.no_grad():
            for _ in range(max(1, warmup_iters)):
                fn()
            graph.capture_begin(capture_error_mode=capture_error_mode)
            try:
                outputs = tuple(fn())
            except BaseException:
                try:
                    graph.capture_end()
                except Exception:  # the capture is already invalid; the original error matters
                    pass
                raise
            graph.capture_end()
    caller.wait_stream(side)

    def free() -> None:
        graph.reset()

    return CapturedGraph(replay=graph.replay, outputs=outputs, keepalive=(keepalive, graph), free=free)


class BoundedGraphCapture:
    """Graph captures of one stage, with the bookkeeping both fast stages share: at most
    ``max_captures`` captures (one-off shapes or thresholds changing per frame would otherwise
    capture forever), and on the first capture failure or past that bound graphs stay off for
    the stage, with the reason logged once. ``capture`` returning ``None`` means: run eagerly.

    All captures go through one side ``stream`` (see :func:`capture_cuda_graph`)."""

    def __init__(self, stage: str, device: torch.device, max_captures: int, what: str) -> None:
        self.stage = stage
        self.device = device
        self.max_captures = int(max_captures)
        self.what = what  # what varies between captures, for the bound's message
        self.stream = torch.cuda.Stream(device)
        self.captures = 0
        self.fallback_reason: Optional[str] = None

    def capture(self, fn: Callable[[], Sequence[torch.Tensor]], keepalive: Any = None) -> Optional[CapturedGraph]:
        """Capture ``fn`` (its warm-up call inside already computes this call's result)."""
        if self.fallback_reason is not None:
            return None
        if self.captures >= self.max_captures:
            self.disable(f"more than {self.max_captures} {self.what} seen; running eagerly")
            return None
        try:
            graph = capture_cuda_graph(fn, device=self.device, warmup_iters=1, stream=self.stream,
                                       keepalive=keepalive)
        except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
            self.disable(f"capture failed: {type(error).__name__}: {error}")
            return None
        self.captures += 1
        return graph

    def disable(self, reason: str) -> None:
        if self.fallback_reason is None:
            self.fallback_reason = reason
            LOGGER.warning("%s: CUDA graphs off: %s", self.stage, reason)


class GraphCaptureStats:
    """Mixin for a stage whose captures go through a :class:`BoundedGraphCapture` held in
    ``_captures`` (None: graphs not requested or no CUDA)."""

    _captures: Optional[BoundedGraphCapture] = None

    @property
    def graph_fallback_reason(self) -> Optional[str]:
        """Why CUDA graphs went off for this stage (None while they are on or not requested)."""
        return self._captures.fallback_reason if self._captures is not None else None

    @property
    def captures(self) -> int:
        """Graphs captured so far."""
        return self._captures.captures if self._captures is not None else 0

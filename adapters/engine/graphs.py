"""CUDA-graph capture and replay, one bounded cache shared by the engines and the fast stages.

Two layers:

* :func:`capture_cuda_graph` - the CUDA part: warm-up iterations of a callable on a side stream
  (lazy initialisations such as cuBLAS handles, TensorRT's deferred updates or our geometry caches
  happen there, outside the capture), then one capture into a fresh private memory pool with
  ``capture_error_mode="thread_local"`` so other threads' CUDA calls (another engine running eagerly,
  allocations) neither fail nor break this capture. A failed capture is always ended so the stream
  never stays in capture mode.
* :class:`GraphCache` - pure bookkeeping, testable without a GPU, used by the torch and TensorRT
  engines, the Triton preprocess and the fused postprocess alike: a bounded LRU of captured graphs
  per key, an optional bound on captures over the cache's life, optional capture on a key's second
  sighting, and per key up to ``max_inflight`` graph *instances* when consumers hold outputs (the
  engine), each with its own output buffers and pool, so a consumer may still hold one instance's
  outputs while the next call replays another (see ``base.py`` for the ``release`` policy).
  Eviction drops the graphs, their outputs and their pool references. Every reason to run
  eagerly is logged once; a capture error, or the capture bound, turns graphs off for the stage.

Instances of one key do not share a memory pool on purpose: a graph captured later into a shared
pool may place its *live outputs* in blocks that an earlier graph uses as scratch, so replaying the
earlier graph while the later one's outputs are held would overwrite them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

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
    key: Hashable
    binding: Any  # what the graph's addresses point into (a static input); another one -> recapture
    instances: List[_Instance] = field(default_factory=list)


@dataclass
class GraphRun:
    outputs: Tuple[torch.Tensor, ...]
    release: Callable[..., None]
    instance: int


# (callable to capture, what the graph must keep alive) -> one captured instance
CaptureFn = Callable[[Callable[[], Sequence[torch.Tensor]], Any], CapturedGraph]


class GraphCache:
    """The captured CUDA graphs of one stage, bounded; decides graph replay vs. eager per call.

    Args:
        name: Stage name used in log messages (e.g. ``"torch engine"``).
        capture: Captures one instance from ``(fn, keepalive)``; see :func:`side_stream_capture`.
        capacity: Keys kept; the least recently used is evicted and its graphs freed.
        max_captures: Captures allowed over the cache's life (None: unbounded). Keys that keep
            changing (thresholds per frame, one-off frame shapes) would otherwise capture forever;
            past the bound capturing stops, with the reason logged: the keys still cached keep
            replaying, any other key runs eagerly (and evicts nothing).
        what: What varies between keys, for the bound's message.
        capture_after: A key is captured on its n-th sighting; earlier calls run eagerly.
        max_inflight: Instances per key (only > 1 makes sense with ``consumers_hold``).
        consumers_hold: Replayed outputs stay held until the caller's ``release`` (the engine's
            outputs go downstream); otherwise a replay's outputs are consumed in stream order and
            the instance is free again at once (the stages write into their own buffers).
        replay_after_capture: False when the capture's warm-up call already computed this call's
            result (the stages write fixed buffers), so the first call does not run twice.
        wait_event / record_event: Make the replay stream wait on a consumer's release event /
            record one on the caller's stream (only with ``consumers_hold``).
        before_evict: Called with the key before its graphs are freed (e.g. to let a queued
            replay finish).
        stats: Optional object whose ``captures`` / ``evictions`` counters are kept too.

    Call :meth:`run` with the stage's lock held; ``release`` callables may be called from any
    thread.

    Example:
        >>> cache = GraphCache("toy", capture=lambda fn, keep: CapturedGraph(fn, tuple(fn())),
        ...                    capacity=2)
        >>> run = cache.run("key", lambda: ((lambda: (torch.ones(1),)), None))
        >>> cache.captures, run.outputs[0].item()
        (1, 1.0)
    """

    def __init__(
        self,
        name: str,
        *,
        capture: CaptureFn,
        capacity: int,
        max_captures: Optional[int] = None,
        what: str = "keys",
        capture_after: int = 1,
        max_inflight: int = 1,
        consumers_hold: bool = False,
        replay_after_capture: bool = True,
        wait_event: Optional[Callable[[Any], None]] = None,
        record_event: Optional[Callable[[], Any]] = None,
        before_evict: Optional[Callable[[Hashable], None]] = None,
        stats: Any = None,
        logger: logging.Logger = LOGGER,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if capture_after < 1:
            raise ValueError(f"capture_after must be >= 1, got {capture_after}")
        if consumers_hold and (wait_event is None or record_event is None):
            raise ValueError("consumers_hold needs wait_event and record_event")
        self.name = name
        self._capture = capture
        self.max_captures = None if max_captures is None else int(max_captures)
        self._what = what
        self._capture_after = int(capture_after)
        self.max_inflight = int(max_inflight)
        self._consumers_hold = bool(consumers_hold)
        self._replay_after_capture = bool(replay_after_capture)
        self._wait_event = wait_event
        self._record_event = record_event
        self._before_evict = before_evict
        self._stats = stats
        self._logger = logger
        self.captures = 0
        self.captured_ahead = 0  # of the captures, those made by prepare()
        self.evictions = 0
        self.disabled_reason: Optional[str] = None
        self.capture_stop_reason: Optional[str] = None  # set once the capture bound is spent
        self._logged: set = set()
        self._lock = threading.RLock()  # guards instance state against releases from other threads
        self._cache: LRUCache[Hashable, _Entry] = LRUCache(capacity, on_evict=self._evict)
        # keys seen fewer than capture_after times (bounded: one-off keys must not pile up)
        self._sightings: LRUCache[Hashable, int] = LRUCache(max(8 * int(capacity), 64))

    # ------------------------------------------------------------------ public

    def run(
        self,
        key: Hashable,
        build: Callable[[], Tuple[Callable[[], Sequence[torch.Tensor]], Any]],
        binding: Any = None,
    ) -> Optional[GraphRun]:
        """Replays the graph of ``key``, capturing it first if needed; None means "run eagerly".

        ``build()`` returns ``(fn, keepalive)`` for a capture and is only called when one is made.
        A cached graph bound to another ``binding`` object is dropped and recaptured.
        """
        with self._lock:
            if self.disabled_reason is not None:
                return None
            entry = self._entry_for(key, binding)
            if entry is None:
                if self._bound_spent() or not self._sighted_enough(key):  # past the bound: no sightings kept
                    return None
                entry = self._new_entry(key, binding)
            inst = next((i for i in entry.instances if not i.held), None)
            fresh = inst is None
            if fresh:
                inst = self._new_instance(entry, build)
                if inst is None:
                    return None
            if inst.free_event is not None:
                self._wait_event(inst.free_event)
                inst.free_event = None
            if self._replay_after_capture or not fresh:
                inst.graph.replay()
            release = _no_release
            if self._consumers_hold:
                inst.held = True
                inst.generation += 1
                release = self._make_release(inst, inst.generation)
            return GraphRun(outputs=inst.graph.outputs, release=release,
                            instance=entry.instances.index(inst))

    def peek(self, key: Hashable) -> Optional[CapturedGraph]:
        """The first captured instance of ``key`` (benchmarks time its replay), without touching
        the LRU order."""
        with self._lock:
            entry = self._cache.peek(key)
            return entry.instances[0].graph if entry is not None and entry.instances else None

    def prepare(
        self,
        key: Hashable,
        build: Callable[[], Tuple[Callable[[], Sequence[torch.Tensor]], Any]],
        binding: Any = None,
    ) -> bool:
        """Captures the graph of ``key`` ahead of need, without replaying it or holding it; True
        when it captured one. False: already cached for ``binding``, graphs off, the capture failed
        (which turns graphs off as in :meth:`run`), or half the capture bound is spent: the rest is
        kept for calls that come, so a capture made only in case never turns the stage's graphs off."""
        with self._lock:
            if self.disabled_reason is not None:
                return False
            if self.max_captures is not None and self.captures >= self.max_captures // 2:
                return False
            entry = self._entry_for(key, binding)
            if entry is not None and entry.instances:
                return False
            if self._new_instance(entry or self._new_entry(key, binding), build) is None:
                return False
            self.captured_ahead += 1
            return True

    def discard(self, key: Hashable) -> None:
        """Frees the graphs of ``key`` (its buffers are going away)."""
        with self._lock:
            self._cache.pop(key)

    def note_fallback(self, reason: str) -> None:
        """Logs a run-eagerly reason, once per distinct reason."""
        if reason not in self._logged:
            self._logged.add(reason)
            self._logger.warning("%s: %s", self.name, reason)

    def disable(self, reason: str) -> None:
        """Turns graphs off for the stage (the reason is logged once and kept)."""
        if self.disabled_reason is None:
            self.disabled_reason = reason
            self.note_fallback(f"CUDA graphs off: {reason}")

    def keys(self) -> List[Hashable]:
        with self._lock:
            return self._cache.keys()

    def instances(self, key: Hashable) -> int:
        with self._lock:
            entry = self._cache.get(key)
            return 0 if entry is None else len(entry.instances)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)

    # ------------------------------------------------------------------ internals

    def _entry_for(self, key: Hashable, binding: Any) -> Optional[_Entry]:
        """The cached entry of ``key`` when it is bound to ``binding``; one bound elsewhere is dropped
        (the stage replaced the buffers its graphs point into)."""
        entry = self._cache.get(key)
        if entry is not None and entry.binding is not binding:
            self._cache.pop(key)
            return None
        return entry

    def _new_entry(self, key: Hashable, binding: Any) -> _Entry:
        entry = _Entry(key=key, binding=binding)
        self._cache.put(key, entry)
        return entry

    def _sighted_enough(self, key: Hashable) -> bool:
        if self._capture_after == 1:
            return True
        seen = (self._sightings.get(key) or 0) + 1
        if seen < self._capture_after:
            self._sightings.put(key, seen)
            return False
        self._sightings.pop(key)
        return True

    def _new_instance(self, entry: _Entry, build: Callable[[], Tuple[Any, Any]]) -> Optional[_Instance]:
        if len(entry.instances) >= self.max_inflight:
            self.note_fallback(
                f"all {self.max_inflight} graph instances for {entry.key} are still held by "
                "consumers (release() not called yet): running eager for this call"
            )
            return None
        if self._bound_spent():
            self._drop_if_empty(entry)
            return None
        try:
            fn, keepalive = build()
            graph = self._capture(fn, keepalive)
        except Exception as error:  # noqa: BLE001 - capture is an optimisation: never fail the call
            self.disable(f"CUDA graph capture failed for {entry.key}: {type(error).__name__}: {error}")
            self._drop_if_empty(entry)
            return None
        self.captures += 1
        if self._stats is not None:
            self._stats.captures += 1
        inst = _Instance(graph=graph)
        entry.instances.append(inst)
        return inst

    def _bound_spent(self) -> bool:
        """True once ``max_captures`` captures were made (logged the first time)."""
        if self.max_captures is None or self.captures < self.max_captures:
            return False
        if self.capture_stop_reason is None:
            self.capture_stop_reason = (f"more than {self.max_captures} {self._what} seen; the graphs cached "
                                        "still replay, other keys run eagerly")
            self.note_fallback(f"CUDA graph captures stopped: {self.capture_stop_reason}")
        return True

    def _drop_if_empty(self, entry: _Entry) -> None:
        if not entry.instances:
            self._cache.pop(entry.key, notify=False)

    def _make_release(self, inst: _Instance, generation: int) -> Callable[..., None]:
        def release(event: Optional[Any] = None) -> None:
            with self._lock:
                # A stale or repeated release (instance re-replayed or evicted since) is a no-op.
                if not inst.held or inst.generation != generation:
                    return
                inst.free_event = event if event is not None else self._record_event()
                inst.held = False

        return release

    def _evict(self, key: Hashable, entry: _Entry) -> None:
        if self._before_evict is not None:
            self._before_evict(key)
        for inst in entry.instances:
            if inst.graph.free is not None:
                inst.graph.free()
            # Held outputs stay valid: the consumer's references keep their storage alive.
            inst.held = False
            inst.generation += 1
        entry.instances.clear()
        self.evictions += 1
        if self._stats is not None:
            self._stats.evictions += 1


def _no_release(event: Optional[Any] = None) -> None:
    return None


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


def side_stream_capture(device: torch.device, warmup_iters: int = 1) -> CaptureFn:
    """A ``capture`` for :class:`GraphCache`: :func:`capture_cuda_graph` on one side stream,
    created on the first capture and reused by every later one."""
    streams: List["torch.cuda.Stream"] = []

    def capture(fn: Callable[[], Sequence[torch.Tensor]], keepalive: Any) -> CapturedGraph:
        if not streams:
            streams.append(torch.cuda.Stream(device=device))
        return capture_cuda_graph(fn, device=device, warmup_iters=warmup_iters,
                                  keepalive=keepalive, stream=streams[0])

    return capture


class GraphCaptureStats:
    """Mixin for a stage whose graphs live in a :class:`GraphCache` held in ``_graphs``
    (None: graphs not requested or no CUDA)."""

    _graphs: Optional[GraphCache] = None

    @property
    def graph_fallback_reason(self) -> Optional[str]:
        """Why CUDA graphs went off for this stage (None while they are on or not requested)."""
        return self._graphs.disabled_reason if self._graphs is not None else None

    @property
    def captures(self) -> int:
        """Graphs captured so far."""
        return self._graphs.captures if self._graphs is not None else 0

    def graph_summary(self) -> Dict[str, Any]:
        """Captures, evictions and live keys so far, and why graphs went off (None while they are on,
        never asked for, or unavailable to a stage that does not say why: the engine says why).

        Benchmarks report it after a run: captures that keep growing mean keys that keep changing.

        Example:
            >>> stage.graph_summary()  # doctest: +SKIP
            {'captures': 2, 'captured_ahead': 0, 'evictions': 0, 'live_keys': 2, 'off_reason': None, 'captures_stopped': None}
        """
        graphs = self._graphs
        return {"captures": self.captures, "captured_ahead": 0 if graphs is None else graphs.captured_ahead,
                "evictions": 0 if graphs is None else graphs.evictions,
                "live_keys": 0 if graphs is None else len(graphs), "off_reason": self.graph_fallback_reason,
                "captures_stopped": None if graphs is None else graphs.capture_stop_reason}

"""Engine stage on the CPU: the CUDA-graph cache's bookkeeping and the engine call flow, through fakes
that stand in for the GPU objects (they test our bookkeeping, not CUDA).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Dict, List, Tuple

import pytest
import torch

from inference_fastpath.adapters.engine import base
from inference_fastpath.adapters.engine import batch_padding
from inference_fastpath.adapters.engine import graphs as cuda_graphs
from inference_fastpath.adapters.engine.base import EngineStats, materialize_outputs
from inference_fastpath.adapters.engine.exported_models import order_output_names, plan_batch_chunks
from inference_fastpath.adapters.caches import LRUCache
from inference_fastpath.adapters.engine.graphs import CapturedGraph, GraphCache, make_graph_key
from inference_fastpath.adapters.contracts import PreprocessedBatch, RawOutputs


# ----------------------------------------------------------------------------- graph runner (fake GPU)


class FakeGraphs:
    """Stands in for capture_cuda_graph: a 'graph' whose replay copies the static input's mean."""

    def __init__(self, fail: bool = False) -> None:
        self.captured: List[Tuple] = []
        self.freed: List[Tuple] = []
        self.waited: List[object] = []
        self.fail = fail

    def capture(self, fn, keepalive) -> CapturedGraph:
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        key, static_input = keepalive
        self.captured.append(key)
        out = torch.zeros(key[0])

        def replay():
            out.copy_(static_input.reshape(key[0], -1).mean(dim=1))

        return CapturedGraph(replay=replay, outputs=(out,), free=lambda: self.freed.append(key))

    def runner(self, capacity=2, max_inflight=2, stats=None) -> "FakeEngineGraphs":
        cache = GraphCache(
            "fake engine",
            capture=self.capture,
            capacity=capacity,
            max_inflight=max_inflight,
            consumers_hold=True,
            wait_event=self.waited.append,
            record_event=lambda: "recorded-on-current-stream",
            stats=stats,
        )
        return FakeEngineGraphs(cache)


class FakeEngineGraphs:
    """Calls a GraphCache the way EngineBase does: keyed by shape, bound to the static input."""

    def __init__(self, cache: GraphCache) -> None:
        self.cache = cache

    def run(self, key, static_input):
        return self.cache.run(key, lambda: ((lambda: ()), (key, static_input)), binding=static_input)

    def __getattr__(self, name):
        return getattr(self.cache, name)

    def __len__(self) -> int:
        return len(self.cache)


def _key(batch: int):
    return make_graph_key(batch, (3, 4, 4), torch.float32)


def _inputs(*batches: int) -> Dict[int, torch.Tensor]:
    return {b: torch.full((b, 3, 4, 4), float(b)) for b in batches}


def test_lru_cache_evicts_least_recently_used():
    evicted = []
    cache: LRUCache[str, int] = LRUCache(2, on_evict=lambda k, v: evicted.append(k))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a becomes most recent
    assert cache.put("c", 3) == ["b"]
    assert cache.keys() == ["a", "c"] and evicted == ["b"]
    cache.clear()
    assert len(cache) == 0 and sorted(evicted) == ["a", "b", "c"]
    with pytest.raises(ValueError):
        LRUCache(0)


def test_graph_cache_eviction_frees_graphs_and_recaptures():
    fake = FakeGraphs()
    stats = EngineStats()
    runner = fake.runner(capacity=2, stats=stats)
    buffers = _inputs(1, 2, 4)
    for b in (1, 2):
        run = runner.run(_key(b), buffers[b])
        assert torch.equal(run.outputs[0], torch.full((b,), float(b)))
        run.release(None)
    runner.run(_key(1), buffers[1]).release(None)  # touch 1: 2 is now least recently used
    runner.run(_key(4), buffers[4]).release(None)
    assert runner.keys() == [_key(1), _key(4)]
    assert fake.freed == [_key(2)] and stats.evictions == 1
    runner.run(_key(2), buffers[2]).release(None)  # comes back: captured again, evicts 1
    assert fake.captured == [_key(1), _key(2), _key(4), _key(2)]
    assert stats.captures == 4 and fake.freed == [_key(2), _key(1)]
    runner.clear()
    assert len(runner) == 0 and len(fake.freed) == 4


def test_graph_outputs_are_not_replayed_while_held(caplog):
    fake = FakeGraphs()
    runner = fake.runner(max_inflight=2)
    x = _inputs(1)[1]
    first = runner.run(_key(1), x)
    second = runner.run(_key(1), x)  # first still held: a second instance is captured
    assert first.instance == 0 and second.instance == 1
    assert first.outputs[0] is not second.outputs[0]
    assert runner.instances(_key(1)) == 2
    with caplog.at_level(logging.WARNING, logger=cuda_graphs.LOGGER.name):
        assert runner.run(_key(1), x) is None  # both held: caller runs eagerly
        assert runner.run(_key(1), x) is None
    held_msgs = [r for r in caplog.records if "still held" in r.getMessage()]
    assert len(held_msgs) == 1  # logged once
    first.release("consumer-event")
    third = runner.run(_key(1), x)
    assert third.instance == 0
    assert fake.waited == ["consumer-event"]  # the replay waited on the consumer's event


def test_release_is_idempotent_and_stale_releases_are_ignored():
    fake = FakeGraphs()
    runner = fake.runner(max_inflight=1)
    x = _inputs(1)[1]
    run = runner.run(_key(1), x)
    run.release(None)
    run.release("late")  # second release of the same run: no effect
    again = runner.run(_key(1), x)
    assert fake.waited == ["recorded-on-current-stream"]
    run.release(None)  # stale: belongs to the previous replay
    assert runner.run(_key(1), x) is None  # `again` still holds the only instance
    again.release(None)
    assert runner.run(_key(1), x) is not None


def test_capture_failure_disables_graphs_with_reason(caplog):
    fake = FakeGraphs(fail=True)
    runner = fake.runner()
    with caplog.at_level(logging.WARNING, logger=cuda_graphs.LOGGER.name):
        assert runner.run(_key(1), _inputs(1)[1]) is None
        assert runner.run(_key(2), _inputs(2)[2]) is None
    assert "capture failed" in runner.disabled_reason
    assert "not permitted" in runner.disabled_reason
    assert len([r for r in caplog.records if "capture failed" in r.getMessage()]) == 1
    assert len(runner) == 0


def test_plan_batch_chunks():
    assert plan_batch_chunks(3, None, None) == [(0, 3, 3)]
    assert plan_batch_chunks(1, 2, 2) == [(0, 1, 2)]
    assert plan_batch_chunks(5, 2, 2) == [(0, 2, 2), (2, 4, 2), (4, 5, 2)]
    assert plan_batch_chunks(6, 1, 4) == [(0, 4, 4), (4, 6, 2)]
    with pytest.raises(ValueError):
        plan_batch_chunks(0, None, None)


def test_order_output_names():
    assert order_output_names(["masks", "dets", "labels"]) == ("dets", "labels", "masks")
    assert order_output_names(["pred_logits", "pred_masks", "pred_boxes"]) == ("pred_boxes", "pred_logits", "pred_masks")
    assert order_output_names(["out0", "out1", "out2"]) == ("out0", "out1", "out2")


def test_materialize_outputs_on_cpu_clones_and_releases():
    released = []
    raw = RawOutputs(
        boxes=torch.ones(1, 2, 4), logits=torch.ones(1, 2, 3), masks=torch.ones(1, 2, 2, 2),
        release=lambda event=None: released.append(event),
    )
    boxes, logits, masks = materialize_outputs(raw)
    assert boxes.data_ptr() != raw.boxes.data_ptr() and torch.equal(masks, raw.masks)
    assert released == [None]


# ----------------------------------------------------------------------------- engine call flow (fake CUDA)


class FakeEvent:
    def __init__(self, *args, **kwargs) -> None:
        self.recorded_on = None

    def record(self, stream=None) -> None:
        self.recorded_on = stream

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class FakeStream:
    def __init__(self, *args, **kwargs) -> None:
        self.waited_events: List[object] = []
        self.waited_streams: List[object] = []
        self.cuda_stream = 0

    def wait_event(self, event) -> None:
        self.waited_events.append(event)

    def wait_stream(self, stream) -> None:
        self.waited_streams.append(stream)

    def synchronize(self) -> None:
        pass


class _NullContext:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class ToyEngine(base.EngineBase):
    """boxes = per-sample mean, logits = per-sample max, masks = input pooled to 2x2."""

    name = "toy"
    supports_cuda_graphs = True

    def __init__(self, min_batch: int = 1, **kwargs) -> None:
        self.forwards = 0
        self.min_batch = min_batch
        super().__init__(device=torch.device("cpu"), input_hw=(4, 4), **kwargs)

    def _physical_batch(self, n: int) -> int:
        return max(n, self.min_batch)

    def _batch_chunks(self, n: int):
        return plan_batch_chunks(n, self.min_batch, None)

    def _forward(self, x):
        self.forwards += 1
        flat = x.reshape(x.shape[0], -1)
        return (
            flat.mean(1).reshape(-1, 1, 1).expand(-1, 2, 4).clone(),
            flat.amax(1).reshape(-1, 1, 1).expand(-1, 2, 3).clone(),
            torch.nn.functional.avg_pool2d(x[:, :2], 2),
        )


def _expected(x):
    flat = x.reshape(x.shape[0], -1)
    return flat.mean(1), flat.amax(1)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Routes EngineBase's CUDA calls to fakes; graphs 'capture' by running the callable."""
    current = FakeStream()
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", _NullContext)
    monkeypatch.setattr(torch.cuda, "device", _NullContext)
    monkeypatch.setattr(base, "stream_made_current", _NullContext)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    captures = []

    def fake_capture(fn, *, device, warmup_iters, keepalive=None, stream=None):
        captures.append(fn)
        outputs = tuple(fn())

        def replay():
            for out, new in zip(outputs, fn()):
                out.copy_(new)

        return CapturedGraph(replay=replay, outputs=outputs)

    monkeypatch.setattr(base, "capture_cuda_graph", fake_capture)
    return SimpleNamespace(current=current, captures=captures)


def _as_cuda_engine(engine: ToyEngine, max_inflight: int = 2) -> ToyEngine:
    engine._is_cuda = True
    engine._stream = FakeStream()
    engine._graphs = engine._graph_cache(4, max_inflight)
    return engine


def test_engine_flow_in_place_buffer_and_copies(fake_cuda):
    engine = _as_cuda_engine(ToyEngine(cuda_graphs=False))
    buffer = engine.input_buffer(2)
    buffer.copy_(torch.arange(2 * 3 * 16, dtype=torch.float32).reshape(2, 3, 4, 4))
    ready = FakeEvent()
    raw = engine(PreprocessedBatch(tensor=buffer, metadata=[], ready_event=ready))
    assert engine._stream.waited_events[0] is ready  # waited on the producer's event, no host sync
    mean, peak = _expected(buffer)
    assert torch.equal(raw.boxes[:, 0, 0], mean) and torch.equal(raw.logits[:, 0, 0], peak)
    assert engine.stats.input_copies == 0 and engine.stats.graph_replays == 1
    assert isinstance(raw.done_event, FakeEvent) and raw.done_event.recorded_on is engine._stream
    raw.release(None)
    # a foreign tensor is copied into the same static buffer; no ready_event: wait on the caller's stream
    other = torch.randn(2, 3, 4, 4)
    raw = engine(PreprocessedBatch(tensor=other, metadata=[]))
    assert engine._stream.waited_streams == [fake_cuda.current]
    assert engine.stats.input_copies == 1 and torch.equal(buffer, other)
    assert torch.equal(raw.boxes[:, 0, 0], _expected(other)[0])
    assert len(fake_cuda.captures) == 1  # the released instance was replayed, not recaptured
    # the producer's stream is made to wait for the last forward that read the buffer
    producer = FakeStream()
    assert engine.input_buffer(2, stream=producer).data_ptr() == buffer.data_ptr()
    assert producer.waited_events == [raw.done_event]


def test_engine_flow_held_outputs_survive_and_eager_fallback(fake_cuda):
    engine = _as_cuda_engine(ToyEngine(cuda_graphs=False), max_inflight=2)
    xs = [torch.full((1, 3, 4, 4), float(i)) for i in range(3)]
    raws = [engine(PreprocessedBatch(tensor=x, metadata=[])) for x in xs]
    assert engine.stats.graph_replays == 2 and engine.stats.eager_runs == 1
    assert len(fake_cuda.captures) == 2
    for raw, x in zip(raws, xs):  # nothing was overwritten while held
        assert torch.equal(raw.boxes[:, 0, 0], _expected(x)[0])
    consumer_event = FakeEvent()
    raws[0].release(consumer_event)
    engine(PreprocessedBatch(tensor=xs[1], metadata=[]))
    assert engine._stream.waited_events[-1] is consumer_event  # replay waited for the consumer
    assert torch.equal(raws[1].boxes[:, 0, 0], _expected(xs[1])[0])


def test_engine_flow_padding_and_copy_mode(fake_cuda):
    engine = _as_cuda_engine(ToyEngine(min_batch=4, cuda_graphs=False, output_mode="copy"))
    assert engine.input_buffer(1).shape == (1, 3, 4, 4)  # a view of the padded (4, ...) buffer
    assert engine._input_buffers[(4, 4, 4)].shape == (4, 3, 4, 4)
    x = torch.randn(1, 3, 4, 4)
    first = engine(PreprocessedBatch(tensor=x, metadata=[]))
    second = engine(PreprocessedBatch(tensor=torch.zeros(1, 3, 4, 4), metadata=[]))
    assert first.boxes.shape == (1, 2, 4)  # padding rows sliced away
    assert torch.equal(first.boxes[:, 0, 0], _expected(x)[0])  # owned copy: not overwritten
    assert len(fake_cuda.captures) == 1 and engine.stats.graph_replays == 2


def test_engine_flow_eager_parks_released_outputs(fake_cuda):
    engine = _as_cuda_engine(ToyEngine(cuda_graphs=False))
    engine._graphs = None  # eager engine on "CUDA"
    x = torch.randn(3, 3, 4, 4)
    raw = engine(PreprocessedBatch(tensor=x, metadata=[]))
    assert engine.stats.input_copies == 0 and engine.stats.eager_runs == 1
    raw.release(FakeEvent())
    assert len(engine._parked) == 1
    engine(PreprocessedBatch(tensor=x, metadata=[]))  # the completed event lets them go
    assert len(engine._parked) == 0


class BucketingToyEngine(ToyEngine):
    """The toy network with EngineBase's own batch policy (no profile minimum)."""

    _physical_batch = base.EngineBase._physical_batch
    _batch_chunks = base.EngineBase._batch_chunks


@pytest.mark.parametrize("largest", [1, 2, 5, 8, 12, 16, 33])
def test_graph_batch_size_grid(largest):
    for n in range(1, 40):
        phys = batch_padding.graph_batch_size(n, largest)
        if n >= largest:
            assert phys == n
        else:
            assert n <= phys <= largest and (phys == largest or phys & (phys - 1) == 0), (n, largest, phys)
            assert phys < 2 * n  # never more than double the rows
    sizes = {batch_padding.graph_batch_size(n, largest) for n in range(1, largest + 1)}
    assert len(sizes) <= (largest - 1).bit_length() + 1  # powers of two below largest, and largest
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        batch_padding.graph_batch_size(0, largest)


def test_engine_flow_partial_batches_replay_a_few_bucketed_graphs(fake_cuda):
    engine = _as_cuda_engine(BucketingToyEngine(cuda_graphs=False))
    full = torch.randn(8, 3, 4, 4)
    engine(PreprocessedBatch(tensor=full, metadata=[])).release(None)
    for n in (5, 3, 8, 6, 1, 2, 7, 4, 3, 5):
        x = torch.randn(n, 3, 4, 4)
        buffer = engine.input_buffer(n)
        assert buffer.shape[0] == n  # the producer writes n rows of the bucket's buffer
        buffer.copy_(x)
        raw = engine(PreprocessedBatch(tensor=buffer, metadata=[]))
        assert raw.boxes.shape[0] == n and torch.equal(raw.boxes[:, 0, 0], _expected(x)[0]), n
        raw.release(None)
    assert sorted(k[0] for k in engine.cached_graph_keys()) == [1, 2, 4, 8]
    assert sorted(b for b, _, _ in engine._input_buffers) == [1, 2, 4, 8]
    assert engine.graph_summary() == {"captures": 4, "captured_ahead": 0, "evictions": 0, "live_keys": 4,
                                      "off_reason": None, "captures_stopped": None}
    assert engine.stats.input_copies == 1 and engine.stats.eager_runs == 0  # only `full` came from elsewhere
    # a batch above the largest becomes the new largest and runs unpadded
    raw = engine(PreprocessedBatch(tensor=torch.randn(11, 3, 4, 4), metadata=[]))
    assert raw.boxes.shape[0] == 11 and engine.cached_graph_keys()[-1][0] == 11


def test_batch_padding_hands_out_the_smaller_sizes_once_the_largest_holds():
    padding = batch_padding.BatchPadding(prepare_after=3)
    for n in (1, 2, 3, 5, 6):  # sources coming online one by one: the largest keeps growing
        assert padding(n) == n and padding.sizes_to_prepare() == []
    assert padding(6) == 6 and padding.sizes_to_prepare() == []
    assert padding(3) == 4 and padding.sizes_to_prepare() == [1, 2, 4]  # third batch since 6 came
    assert padding(6) == 6 and padding.sizes_to_prepare() == []  # once per largest
    assert padding(12) == 12 and [padding.sizes_to_prepare() for _ in range(3)] == [[], [], [1, 2, 4, 8]]
    with pytest.raises(ValueError, match="prepare_after"):
        batch_padding.BatchPadding(prepare_after=0)


@pytest.mark.parametrize("largest", [1, 2, 3, 8, 12, 33, 64])
def test_padded_sizes_below_cover_every_partial_batch(largest):
    below = batch_padding.padded_sizes_below(largest)
    assert below == sorted(set(below)) and all(size < largest for size in below)
    assert {batch_padding.graph_batch_size(n, largest) for n in range(1, largest)} <= set(below) | {largest}


def test_engine_captures_the_padded_sizes_ahead_once_the_largest_holds(fake_cuda):
    engine = _as_cuda_engine(BucketingToyEngine(cuda_graphs=False))
    engine._graphs = engine._graph_cache(8, 2)
    engine._padding = batch_padding.BatchPadding(prepare_after=2)
    for _ in range(2):
        engine(PreprocessedBatch(tensor=torch.randn(8, 3, 4, 4), metadata=[])).release(None)
    assert sorted(k[0] for k in engine.cached_graph_keys()) == [1, 2, 4, 8]
    summary = engine.graph_summary()
    assert (summary["captures"], summary["captured_ahead"]) == (4, 3)
    replays = engine.stats.graph_replays
    for n in (5, 3, 1, 2, 7):
        buffer = engine.input_buffer(n)
        x = torch.randn(n, 3, 4, 4)
        buffer.copy_(x)
        raw = engine(PreprocessedBatch(tensor=buffer, metadata=[]))
        assert torch.equal(raw.boxes[:, 0, 0], _expected(x)[0]), n
        raw.release(None)
    assert engine.graph_summary()["captures"] == 4 and engine.stats.eager_runs == 0
    assert engine.stats.graph_replays == replays + 5  # the captures ahead replayed nothing themselves
    # the prepared buffers are guarded like any other: the producer waits for the capture's reads
    assert (4, 4, 4) in engine._input_free_events


def test_an_engine_cache_of_one_graph_captures_nothing_ahead(fake_cuda):
    engine = _as_cuda_engine(BucketingToyEngine(cuda_graphs=False))
    engine.graph_cache_size = 1
    engine._graphs = engine._graph_cache(1, 2)
    engine._padding = batch_padding.BatchPadding(prepare_after=1)
    for _ in range(3):
        engine(PreprocessedBatch(tensor=torch.randn(8, 3, 4, 4), metadata=[])).release(None)
    assert engine.graph_summary()["captures"] == 1 and engine.graph_summary()["evictions"] == 0

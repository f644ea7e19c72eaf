"""GraphCache as the fast stages use it (no held outputs), with a fake capture (no GPU needed).

The engine's use (held instances, release events) is covered in test_engine_graph_bookkeeping.py; here: capture
on the second sighting, the capture bound, the warm-up computing the first call's result, binding
changes, eviction hooks and discard/peek.
"""

from __future__ import annotations

import logging
from typing import List

import pytest
import torch

from inference_fastpath.adapters.engine import graphs
from inference_fastpath.adapters.engine.graphs import CapturedGraph, GraphCache


class CountingCapture:
    """A fake capture: the warm-up call runs ``fn`` once, replay runs it again."""

    def __init__(self, fail_on: int = -1) -> None:
        self.captures = 0
        self.freed: List[object] = []
        self.fail_on = fail_on

    def __call__(self, fn, keepalive) -> CapturedGraph:
        if self.captures == self.fail_on:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        outputs = tuple(fn())  # warm-up: computes this call's result
        return CapturedGraph(replay=fn, outputs=outputs, keepalive=keepalive,
                             free=lambda: self.freed.append(keepalive))


def _stage_cache(capture, **kwargs) -> GraphCache:
    defaults = dict(capacity=2, replay_after_capture=False)
    defaults.update(kwargs)
    return GraphCache("toy stage", capture=capture, **defaults)


def _launcher(calls: List[str], name: str):
    def launch():
        calls.append(name)
        return ()

    return launch


def test_second_sighting_captures_and_warmup_is_the_first_result():
    capture = CountingCapture()
    cache = _stage_cache(capture, capture_after=2)
    calls: List[str] = []
    build = lambda: (_launcher(calls, "a"), "a-buffers")  # noqa: E731
    assert cache.run("a", build) is None  # first sighting: the caller launches eagerly
    assert capture.captures == 0 and calls == []
    assert cache.run("a", build) is not None  # second: captured; its warm-up was this call's launch
    assert capture.captures == 1 and calls == ["a"]
    assert cache.run("a", build) is not None  # then replayed
    assert calls == ["a", "a"] and cache.captures == 1


def test_replay_after_capture_runs_the_graph_on_the_capturing_call():
    capture = CountingCapture()
    cache = _stage_cache(capture, replay_after_capture=True)
    calls: List[str] = []
    cache.run("a", lambda: (_launcher(calls, "a"), None))
    assert calls == ["a", "a"]  # warm-up + replay (the engine: warm-up outputs are not the static ones)


def test_capture_bound_stops_captures_and_keeps_replaying_the_cached_keys(caplog):
    capture = CountingCapture()
    cache = _stage_cache(capture, max_captures=2, capacity=2, what="frame shapes")
    with caplog.at_level(logging.WARNING, logger=graphs.LOGGER.name):
        for key in ("a", "b", "c", "d"):
            run = cache.run(key, lambda: ((lambda: ()), None))
            assert (run is not None) == (key in ("a", "b"))  # past the bound: eager
    assert capture.captures == 2 and cache.evictions == 0  # the eager keys evicted nothing
    assert cache.disabled_reason is None
    assert cache.capture_stop_reason == "more than 2 frame shapes seen; the graphs cached still replay, other keys run eagerly"
    assert cache.run("a", lambda: ((lambda: ()), None)) is not None  # a cached key still replays
    assert cache.prepare("e", lambda: ((lambda: ()), None)) is False
    assert sorted(cache.keys()) == ["a", "b"]
    assert len([r for r in caplog.records if "more than 2" in r.getMessage()]) == 1


def test_prepare_captures_without_running_and_never_spends_the_bound_of_real_calls():
    capture = CountingCapture()
    cache = _stage_cache(capture, max_captures=4, capacity=8)
    calls: List[str] = []
    assert cache.prepare("a", lambda: (_launcher(calls, "a"), None)) is True
    assert calls == ["a"] and cache.captured_ahead == 1  # the capture's warm-up only, nothing replayed
    assert cache.prepare("a", lambda: (_launcher(calls, "a"), None)) is False  # already there
    assert cache.run("a", lambda: (_launcher(calls, "a"), None)) is not None and calls == ["a", "a"]
    assert cache.prepare("b", lambda: (_launcher(calls, "b"), None)) is True  # 2 captures: half the bound
    assert cache.prepare("c", lambda: (_launcher(calls, "c"), None)) is False  # the rest is for real calls
    assert cache.disabled_reason is None and cache.captures == 2
    for key in ("c", "d"):
        assert cache.run(key, lambda: ((lambda: ()), None)) is not None
    assert cache.disabled_reason is None and cache.captures == 4


def test_capture_failure_disables_and_keeps_nothing(caplog):
    cache = _stage_cache(CountingCapture(fail_on=0))
    with caplog.at_level(logging.WARNING, logger=graphs.LOGGER.name):
        assert cache.run("a", lambda: ((lambda: ()), None)) is None
    assert "capture failed for a: RuntimeError: operation not permitted" in cache.disabled_reason
    assert len(cache) == 0 and cache.captures == 0


def test_stage_instances_are_free_again_at_once():
    capture = CountingCapture()
    cache = _stage_cache(capture, max_inflight=1)
    for _ in range(5):  # no release call: a stage's outputs are consumed in stream order
        assert cache.run("a", lambda: ((lambda: ()), None)) is not None
    assert capture.captures == 1 and cache.instances("a") == 1


def test_a_new_binding_recaptures_and_frees_the_old_graph():
    capture = CountingCapture()
    evicted: List[object] = []
    cache = _stage_cache(capture, before_evict=evicted.append)
    old, new = object(), object()
    cache.run("spec", lambda: ((lambda: ()), "old"), binding=old)
    cache.run("spec", lambda: ((lambda: ()), "new"), binding=new)
    assert capture.captures == 2 and capture.freed == ["old"] and evicted == ["spec"]
    cache.run("spec", lambda: ((lambda: ()), "unused"), binding=new)
    assert capture.captures == 2


def test_lru_eviction_discard_and_peek():
    capture = CountingCapture()
    cache = _stage_cache(capture, capacity=2)
    for key in ("a", "b"):
        cache.run(key, lambda key=key: ((lambda: ()), key))
    assert cache.peek("a") is not None and cache.keys() == ["a", "b"]  # peek keeps the order
    cache.run("c", lambda: ((lambda: ()), "c"))
    assert capture.freed == ["a"] and cache.keys() == ["b", "c"] and cache.evictions == 1
    cache.discard("b")
    assert capture.freed == ["a", "b"] and cache.peek("b") is None
    cache.clear()
    assert len(cache) == 0 and capture.freed == ["a", "b", "c"]


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="max_inflight"):
        _stage_cache(CountingCapture(), max_inflight=0)
    with pytest.raises(ValueError, match="capture_after"):
        _stage_cache(CountingCapture(), capture_after=0)
    with pytest.raises(ValueError, match="consumers_hold"):
        _stage_cache(CountingCapture(), consumers_hold=True)


def test_graph_cache_doc_example():
    cache = GraphCache("toy", capture=lambda fn, keep: CapturedGraph(fn, tuple(fn())), capacity=2)
    run = cache.run("key", lambda: ((lambda: (torch.ones(1),)), None))
    assert cache.captures == 1 and run.outputs[0].item() == 1.0

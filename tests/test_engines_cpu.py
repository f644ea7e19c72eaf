"""Engine stage on the CPU: torch engine parity, graph-cache bookkeeping, TensorRT logic, selection.

The RF-DETR forward costs a few seconds on a small CPU, so the model-backed checks share one
randomly initialised rfdetr-seg-nano and run exactly two forwards (the model's and the engine's).
Everything CUDA- or TensorRT-specific is exercised through fakes that stand in for the GPU
objects: they test our bookkeeping, not CUDA or TensorRT.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from inference_fastpath.adapters import selection
from inference_fastpath.adapters.engine import base
from inference_fastpath.adapters.engine import graphs as cuda_graphs
from inference_fastpath.adapters.engine.reference import ReferenceEngine
from inference_fastpath.adapters.engine.base import (
    EngineStats,
    materialize_outputs,
    order_output_names,
    plan_batch_chunks,
)
from inference_fastpath.adapters.caches import LRUCache
from inference_fastpath.adapters.engine.graphs import CapturedGraph, GraphCache, make_graph_key
from inference_fastpath.adapters.engine.onnx_engine import OnnxEngine, resolve_output_shape
from inference_fastpath.adapters.engine.tensorrt_engine import (
    BatchProfile,
    batch_profile,
    bind_io,
    concrete_input_shape,
    profile_from_trt_config,
    read_io_specs,
    select_io,
    trt_dtype_to_torch,
)
from inference_fastpath.adapters.contracts import PreprocessedBatch, RawOutputs


# ----------------------------------------------------------------------------- model fixtures


@pytest.fixture(scope="module")
def seg_model():
    from inference_fastpath.adapters.engine.torch_engine import build_random_model

    return build_random_model("rfdetr-seg-nano", device="cpu", seed=0)


@pytest.fixture(scope="module")
def torch_engine(seg_model):
    from inference_fastpath.adapters.engine.torch_engine import TorchEngine

    return TorchEngine(seg_model, cuda_graphs=True)  # graphs requested on purpose: must fall back


@pytest.fixture(scope="module")
def parity_outputs(seg_model, torch_engine):
    """The only two RF-DETR forwards of this module: inference-models' and the engine's."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(1, 3, 312, 312, generator=generator)
    reference = seg_model.forward(x.clone())
    raw = torch_engine(PreprocessedBatch(tensor=x, metadata=[]))
    return reference, raw


# ----------------------------------------------------------------------------- torch engine


def test_eager_torch_engine_equals_model_forward(parity_outputs):
    reference, raw = parity_outputs
    assert raw.boxes.shape == (1, 100, 4)
    assert raw.logits.shape == (1, 100, 91)
    assert raw.masks.shape == (1, 100, 78, 78)
    for name, ours in (("pred_boxes", raw.boxes), ("pred_logits", raw.logits), ("pred_masks", raw.masks)):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, reference[name], atol=1e-5, rtol=0, msg=name)
    assert raw.done_event is None
    raw.release(None)
    raw.release(None)  # idempotent


def test_cuda_graphs_on_cpu_fall_back_with_reason(torch_engine, parity_outputs):
    assert torch_engine.cuda_graphs_requested
    assert not torch_engine.cuda_graphs_active
    assert "CUDA" in torch_engine.graph_fallback_reason
    assert torch_engine.stats.eager_runs >= 1 and torch_engine.stats.graph_replays == 0


def test_prepared_module_is_a_private_patched_copy(seg_model, torch_engine, parity_outputs):
    from inference_models.models.rfdetr.ms_deform_attn import MSDeformAttn

    prepared = torch_engine.module
    # instance-level replacements on the copy ...
    assert "forward" in vars(prepared.transformer)
    attns = [m for m in prepared.modules() if isinstance(m, MSDeformAttn)]
    assert attns and all("forward" in vars(m) for m in attns)
    # ... and nothing on the model inference-models owns
    original = seg_model._model
    assert "forward" not in vars(original.transformer)
    assert all("forward" not in vars(m) for m in original.modules() if isinstance(m, MSDeformAttn))
    assert not original._export
    # the proposal geometry was cached by the forward (what makes capture sync-free)
    geometry = getattr(prepared.transformer, "_fastpath_proposal_geometry")
    assert len(geometry) == 1
    (shapes, dtype, _, _), (proposals, invalid) = next(iter(geometry.items()))
    assert shapes == ((26, 26),) and dtype == torch.float32
    assert proposals.shape == (1, 676, 4) and invalid.shape == (1, 676, 1) and invalid.dtype == torch.bool


def test_input_buffer_is_static_per_batch_size(torch_engine):
    first = torch_engine.input_buffer(2)
    again = torch_engine.input_buffer(2)
    assert first.shape == (2, 3, 312, 312) and first.dtype == torch.float32
    assert first.data_ptr() == again.data_ptr()
    assert torch_engine.input_buffer(1).data_ptr() != first.data_ptr()
    assert base.is_same_buffer(again, first)
    assert not base.is_same_buffer(first.clone(), first)


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


# ----------------------------------------------------------------------------- TensorRT logic (fake engine)


class FakeEnum:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeTrtEngine:
    """Duck-types the parts of ICudaEngine we read; -1 dims are dynamic."""

    def __init__(self, batch: Tuple[int, int, int], static: bool = False, out_order=("dets", "labels", "masks")):
        b0 = batch[0] if static else -1
        self.tensors = {"input": ("INPUT", "FLOAT", (b0, 3, 312, 312))}
        specs = {
            "dets": ("OUTPUT", "FLOAT", (b0, 100, 4)),
            "labels": ("OUTPUT", "FLOAT", (b0, 100, 91)),
            "masks": ("OUTPUT", "HALF", (b0, 100, 78, 78)),
        }
        for name in out_order:
            self.tensors[name] = specs[name]
        self.profile = batch
        self.contexts: List["FakeTrtContext"] = []

    @property
    def num_io_tensors(self):
        return len(self.tensors)

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, name):
        return FakeEnum(self.tensors[name][0])

    def get_tensor_dtype(self, name):
        return FakeEnum(self.tensors[name][1])

    def get_tensor_shape(self, name):
        return self.tensors[name][2]

    def get_tensor_profile_shape(self, name, index):
        return [(b, 3, 312, 312) for b in self.profile]

    def create_execution_context(self):
        context = FakeTrtContext(self)
        self.contexts.append(context)
        return context


class FakeTrtContext:
    def __init__(self, engine: FakeTrtEngine) -> None:
        self.engine = engine
        self.batch = None
        self.addresses: Dict[str, int] = {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile
        if not lo <= shape[0] <= hi:
            return False
        self.batch = shape[0]
        return True

    def get_tensor_shape(self, name):
        return (self.batch,) + tuple(self.engine.tensors[name][2][1:])

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer
        return True


def test_trt_io_specs_and_dtypes():
    inputs, outputs = read_io_specs(FakeTrtEngine((1, 2, 4)))
    assert [s.name for s in inputs] == ["input"] and inputs[0].shape == (-1, 3, 312, 312)
    assert [s.name for s in outputs] == ["dets", "labels", "masks"]
    assert outputs[2].dtype == torch.float16 and outputs[0].dtype == torch.float32
    assert trt_dtype_to_torch(FakeEnum("BF16")) == torch.bfloat16
    assert trt_dtype_to_torch("DataType.INT32") == torch.int32
    with pytest.raises(ValueError):
        trt_dtype_to_torch(FakeEnum("FP8"))


def test_trt_output_selection_by_name():
    inputs, outputs = read_io_specs(FakeTrtEngine((1, 1, 1), out_order=("masks", "labels", "dets")))
    input_spec, (boxes, logits, masks) = select_io(inputs, outputs)
    assert (input_spec.name, boxes.name, logits.name, masks.name) == ("input", "dets", "labels", "masks")
    with pytest.raises(ValueError):
        select_io(inputs, outputs[:2])


def test_trt_batch_profiles():
    assert batch_profile(FakeTrtEngine((1, 2, 4)), "input") == BatchProfile(1, 2, 4)
    static = batch_profile(FakeTrtEngine((2, 2, 2), static=True), "input")
    assert static.is_static and static == BatchProfile(2, 2, 2)
    assert [static.physical_batch(n) for n in (1, 2, 3)] == [2, 2, 3]
    assert static.chunks(3) == [(0, 2, 2), (2, 3, 2)]
    assert static.accepts(2) and not static.accepts(1) and not static.accepts(3)
    dynamic = BatchProfile(1, 2, 4)
    assert dynamic.physical_batch(3) == 3 and dynamic.chunks(6) == [(0, 4, 4), (4, 6, 2)]
    assert profile_from_trt_config({"static_batch_size": 4}) == BatchProfile(4, 4, 4)
    cfg = SimpleNamespace(static_batch_size=None, dynamic_batch_size_min=1, dynamic_batch_size_opt=2, dynamic_batch_size_max=8)
    assert profile_from_trt_config(cfg) == BatchProfile(1, 2, 8)
    with pytest.raises(ValueError):
        profile_from_trt_config({"dynamic_batch_size_min": 1})
    with pytest.raises(ValueError):
        BatchProfile(2, 1, 4)


def test_trt_concrete_input_shape():
    assert concrete_input_shape((-1, 3, 312, 312), 2, (312, 312)) == (2, 3, 312, 312)
    assert concrete_input_shape((-1, 3, -1, -1), 1, (384, 640)) == (1, 3, 384, 640)
    with pytest.raises(ValueError):
        concrete_input_shape((-1, 3, 312, 312), 1, (384, 384))


def test_trt_bind_io_sets_shapes_and_addresses():
    engine = FakeTrtEngine((1, 2, 4))
    _, outputs = select_io(*read_io_specs(engine))
    context = engine.create_execution_context()
    static_input = torch.zeros(2, 3, 312, 312)
    bound = bind_io(context, "input", static_input, outputs)
    assert context.batch == 2
    assert bound["dets"].shape == (2, 100, 4) and bound["masks"].shape == (2, 100, 78, 78)
    assert bound["masks"].dtype == torch.float16
    assert context.addresses["input"] == static_input.data_ptr()
    assert all(context.addresses[n] == t.data_ptr() for n, t in bound.items())
    with pytest.raises(RuntimeError):
        bind_io(context, "input", torch.zeros(5, 3, 312, 312), outputs)  # outside the profile
    with pytest.raises(ValueError):
        bind_io(context, "input", torch.zeros(2, 312, 312, 3).permute(0, 3, 1, 2), outputs)


# ----------------------------------------------------------------------------- ONNX engine (tiny graph)


def _tiny_onnx(tmp_path, build, static_batch=None) -> str:
    path = tmp_path / f"tiny_{static_batch}.onnx"
    path.write_bytes(build(static_batch))
    return str(path)


def test_onnx_engine_on_cpu_matches_session(tmp_path, tiny_onnx_bytes):
    import onnxruntime

    path = _tiny_onnx(tmp_path, tiny_onnx_bytes)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    engine = OnnxEngine(session)
    assert engine.device.type == "cpu" and engine.input_hw == (8, 8)
    x = torch.randn(3, 3, 8, 8)
    raw = engine(PreprocessedBatch(tensor=x, metadata=[]))
    expected = session.run(["dets", "labels", "masks"], {"input": x.numpy()})
    for ours, ref in zip((raw.boxes, raw.logits, raw.masks), expected):
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)
    assert engine.graph_fallback_reason is None  # graphs were not requested
    with_graphs = OnnxEngine(session, cuda_graphs=True)
    assert "does not capture CUDA graphs" in with_graphs.graph_fallback_reason


def test_onnx_engine_pads_and_chunks_static_batch(tmp_path, tiny_onnx_bytes):
    import onnxruntime

    session = onnxruntime.InferenceSession(_tiny_onnx(tmp_path, tiny_onnx_bytes, static_batch=2), providers=["CPUExecutionProvider"])
    engine = OnnxEngine(session)
    x = torch.randn(3, 3, 8, 8)
    raw = engine(PreprocessedBatch(tensor=x, metadata=[]))
    assert raw.boxes.shape == (3, 5, 4) and raw.masks.shape == (3, 5, 2, 2)
    single = OnnxEngine(onnxruntime.InferenceSession(_tiny_onnx(tmp_path, tiny_onnx_bytes), providers=["CPUExecutionProvider"]))
    expected = single(PreprocessedBatch(tensor=x, metadata=[]))
    torch.testing.assert_close(raw.boxes, expected.boxes)
    torch.testing.assert_close(raw.masks, expected.masks)
    assert resolve_output_shape(["N", 5, 4], 3) == (3, 5, 4)
    assert resolve_output_shape(["N", "Q", 4], 3) is None


# ----------------------------------------------------------------------------- selection


class FakeOnnxModel:
    def __init__(self, session) -> None:
        self._session = session
        self._input_name = "input"
        self._device = torch.device("cpu")
        self._min_batch_size = None
        self._max_batch_size = None


class FakeTrtModel:
    def __init__(self) -> None:
        self._engine = FakeTrtEngine((1, 1, 1))
        self._execution_context = None
        self._device = torch.device("cpu")  # TensorRT cannot run here: selection must fall back


class FakeForwardModel:
    _device = torch.device("cpu")

    def forward(self, x):
        n = x.shape[0]
        return {"pred_boxes": torch.zeros(n, 2, 4), "pred_logits": torch.zeros(n, 2, 3), "pred_masks": torch.zeros(n, 2, 4, 4)}


def test_selection_torch_package(seg_model, monkeypatch):
    from inference_fastpath.adapters.engine import torch_engine as torch_engine_module
    from inference_fastpath.adapters.engine.torch_engine import TorchEngine

    engine, reason = selection.build_engine("auto", True, seg_model)  # one real build
    assert isinstance(engine, TorchEngine) and "cuda_graphs" in reason and "CUDA" in reason
    # The remaining rules only need the engine's type: skip the (slow) copy of the network.
    monkeypatch.setattr(torch_engine_module, "prepare_capture_safe_module", lambda network, dtype: network)
    engine, reason = selection.build_engine("auto", False, seg_model)
    assert isinstance(engine, TorchEngine) and reason is None
    engine, reason = selection.build_engine("tensorrt", False, seg_model)
    assert isinstance(engine, TorchEngine) and "tensorrt" in reason
    engine, reason = selection.build_engine("onnx", False, seg_model)
    assert isinstance(engine, TorchEngine) and "onnx" in reason
    engine, reason = selection.build_engine("torch", False, seg_model, precision="fp16")
    assert isinstance(engine, TorchEngine) and engine.precision == "fp32" and "fp16" in reason


def test_selection_onnx_package(tmp_path, tiny_onnx_bytes):
    import onnxruntime

    model = FakeOnnxModel(onnxruntime.InferenceSession(_tiny_onnx(tmp_path, tiny_onnx_bytes), providers=["CPUExecutionProvider"]))
    assert selection.detect_backend(model) == "onnx"
    engine, reason = selection.build_engine("auto", False, model)
    assert isinstance(engine, OnnxEngine) and reason is None
    engine, reason = selection.build_engine("auto", True, model)
    assert isinstance(engine, OnnxEngine) and "cuda_graphs" in reason
    engine, reason = selection.build_engine("torch", False, model)
    assert isinstance(engine, OnnxEngine) and "torch" in reason


def test_selection_trt_package_without_gpu_falls_back_and_never_raises():
    model = FakeTrtModel()
    assert selection.detect_backend(model) == "tensorrt"
    engine, reason = selection.build_engine("auto", True, model)
    assert isinstance(engine, ReferenceEngine)
    assert "tensorrt engine could not be built" in reason
    engine, reason = selection.build_engine("torch", False, model)
    assert isinstance(engine, ReferenceEngine) and "torch" in reason


def test_selection_unknown_model_and_bad_request():
    engine, reason = selection.build_engine("auto", False, FakeForwardModel())
    assert isinstance(engine, ReferenceEngine) and "unrecognised" in reason
    raw = engine(PreprocessedBatch(tensor=torch.zeros(2, 3, 8, 8), metadata=[]))
    assert raw.boxes.shape == (2, 2, 4) and raw.masks.shape == (2, 2, 4, 4)
    with pytest.raises(ValueError):
        selection.build_engine("openvino", False, FakeForwardModel())


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

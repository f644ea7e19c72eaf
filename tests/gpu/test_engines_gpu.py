"""Engines on a CUDA GPU: graph replay vs eager, precision, cache eviction, threads, memory, buffers.

Run with ``pytest -m gpu tests/gpu/test_engines_gpu.py``. Models are randomly initialised
rfdetr-seg-nano networks (312x312 input), built offline.
"""

from __future__ import annotations

import copy
import threading
from typing import List, Tuple

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from inference_fastpath.adapters.engine.base import materialize_outputs, outputs_as_model_results  # noqa: E402
from inference_fastpath.adapters.engine.torch_engine import TorchEngine, build_random_model  # noqa: E402
from inference_fastpath.adapters.contracts import PreprocessedBatch, RawOutputs  # noqa: E402

Triple = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
ATOL_FP32 = 1e-5


@pytest.fixture(scope="module")
def model():
    return build_random_model("rfdetr-seg-nano", device="cuda", seed=0)


@pytest.fixture(scope="module")
def eager(model):
    return TorchEngine(model, cuda_graphs=False)


def _input(batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(batch, 3, 312, 312, device="cuda", generator=generator)


def _call(engine, x: torch.Tensor, event=None) -> RawOutputs:
    return engine(PreprocessedBatch(tensor=x, metadata=[], ready_event=event))


def _run(engine, x: torch.Tensor, event=None) -> Triple:
    return materialize_outputs(_call(engine, x, event))


def _assert_same(ours: Triple, ref: Triple, atol: float = ATOL_FP32, what: str = "") -> None:
    for name, a, b in zip(("boxes", "logits", "masks"), ours, ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=f"{what} {name}")


# ----------------------------------------------------------------------------- correctness


def test_graph_replay_equals_eager_fp32(model, eager):
    graph = TorchEngine(model, cuda_graphs=True)
    assert graph.cuda_graphs_active, graph.graph_fallback_reason
    for batch in (1, 2):
        x = _input(batch, seed=batch)
        ref = _run(eager, x)
        for _ in range(3):  # the first call captures, the next ones replay
            _assert_same(_run(graph, x), ref, what=f"batch {batch}")
        x_new = _input(batch, seed=100 + batch)  # the graph reads the buffer, not stale data
        _assert_same(_run(graph, x_new), _run(eager, x_new), what=f"batch {batch} new input")
    assert graph.stats.captures == 2, graph.describe()
    assert graph.stats.graph_replays == 8 and graph.stats.eager_runs == 0, graph.describe()
    assert graph.graph_fallback_reason is None


def test_eager_engine_matches_upstream_export_on_gpu(model, eager):
    """Our capture-safe rewrite computes what inference-models' own export-mode network computes."""
    upstream = copy.deepcopy(model._model).eval()
    upstream.export()
    x = _input(2, seed=7)
    with torch.no_grad():
        ref = tuple(o.float() for o in upstream(x))
    _assert_same(_run(eager, x), ref, atol=1e-4, what="vs upstream export")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_graph_replay_equals_half_precision_eager(model, precision):
    """The capture machinery is exact at every precision: replay == eager of the same engine dtype."""
    eager_half = TorchEngine(model, precision=precision, cuda_graphs=False)
    graph_half = TorchEngine(model, precision=precision, cuda_graphs=True)
    x = _input(1, seed=11)
    ref = _run(eager_half, x)
    atol = {"fp16": 1e-3, "bf16": 1e-2}[precision]  # about one unit in the last place of each format
    for _ in range(2):
        _assert_same(_run(graph_half, x), ref, atol=atol, what=f"{precision} graph vs eager")
    assert graph_half.stats.graph_replays == 2 and graph_half.stats.eager_runs == 0, graph_half.describe()


@pytest.mark.xfail(
    strict=False,
    reason="random weights: the demo network's encoder proposals are near ties, so fp16 rounding selects other "
    "queries (H100: 9 of 13 detections at IoU >= 0.99; over 30 clip frames 62% at IoU >= 0.99, 88% at >= 0.9, "
    "examples/precision_agreement.py). The trained demo model's bar is test_trained_precision_gpu.py.",
)
def test_fp16_graph_detections_match_fp32():
    """fp16 graph vs fp32 graph, compared after inference-models' own post_process.

    A random network's encoder scores are nearly tied, so fp16 rounding reorders the selected
    queries; every query also has its own random content vector (``query_feat``), so a reordering
    would change the outputs for reasons unrelated to precision. Making those vectors identical
    leaves the decoder permutation-equivariant (queries differ only by their selected proposals),
    which makes the comparison about precision. The threshold sits in the widest score gap among
    ranks 10..40 so rounding cannot move a detection across it.
    """
    model = build_random_model("rfdetr-seg-nano", device="cuda", seed=3)
    with torch.no_grad():
        query_feat = model._model.query_feat.weight
        query_feat.copy_(query_feat[:1].expand_as(query_feat).clone())
    image = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    x, meta = model.pre_process(image)
    e32 = TorchEngine(model, precision="fp32", cuda_graphs=True)
    e16 = TorchEngine(model, precision="fp16", cuda_graphs=True)
    assert e16.input_buffer(1).dtype == torch.float16  # an fp16 preprocess can write in place
    out32, out16 = _run(e32, x), _run(e16, x)  # fp32 x: cast while copied into the fp16 buffer
    assert e16.stats.graph_replays == 1 and e16.stats.eager_runs == 0, e16.describe()
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in out16)

    threshold = _threshold_in_widest_gap(out32[1])
    det32 = model.post_process(outputs_as_model_results(_raw(out32)), meta, confidence=threshold)[0]
    det16 = model.post_process(outputs_as_model_results(_raw(out16)), meta, confidence=threshold)[0]
    n32, n16 = det32.xyxy.shape[0], det16.xyxy.shape[0]
    assert n32 >= 5, f"calibration produced only {n32} detections"
    matched = _match_detections(det32, det16, iou_threshold=0.99)
    assert matched / max(n32, n16) >= 0.9, f"{matched} of {n32} (fp32) / {n16} (fp16) matched"


def _raw(triple: Triple) -> RawOutputs:
    return RawOutputs(boxes=triple[0], logits=triple[1], masks=triple[2])


def _threshold_in_widest_gap(logits: torch.Tensor, lo: int = 10, hi: int = 40) -> float:
    scores = logits.double().sigmoid().flatten().sort(descending=True).values.cpu()
    gaps = scores[lo - 1 : hi - 1] - scores[lo:hi]
    rank = lo + int(torch.argmax(gaps))
    return float((scores[rank - 1] + scores[rank]) / 2)


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def _match_detections(a, b, iou_threshold: float) -> int:
    if a.xyxy.shape[0] == 0 or b.xyxy.shape[0] == 0:
        return 0
    iou = _box_iou(a.xyxy.float().cpu(), b.xyxy.float().cpu())
    same_class = a.class_id.cpu()[:, None] == b.class_id.cpu()[None, :]
    iou = torch.where(same_class, iou, torch.zeros_like(iou))
    used, matched = set(), 0
    for i in torch.argsort(a.confidence.cpu(), descending=True).tolist():
        for j in torch.argsort(iou[i], descending=True).tolist():
            if j in used or iou[i, j] < iou_threshold:
                continue
            used.add(j)
            matched += 1
            break
    return matched


# ----------------------------------------------------------------------------- output ownership


def test_held_outputs_are_never_overwritten(model, eager):
    engine = TorchEngine(model, cuda_graphs=True, max_inflight=2)
    xs = [_input(1, seed=20 + i) for i in range(3)]
    refs = [_run(eager, x) for x in xs]
    held = [_call(engine, x) for x in xs]  # nobody releases: instance 0, instance 1, then eager
    assert engine.stats.captures == 2 and engine.stats.eager_runs == 1, engine.describe()
    for raw, ref in zip(held, refs):
        torch.cuda.current_stream().wait_event(raw.done_event)
        _assert_same((raw.boxes, raw.logits, raw.masks), ref, what="held")
    for raw in held:
        raw.release(None)
    _assert_same(_run(engine, xs[0]), refs[0], what="after release")
    assert engine.stats.captures == 2  # released instances are reused, not recaptured


def test_copy_output_mode_hands_out_owned_tensors(model, eager):
    engine = TorchEngine(model, cuda_graphs=True, output_mode="copy")
    x1, x2 = _input(1, seed=31), _input(1, seed=32)
    first = _call(engine, x1)
    second = _call(engine, x2)  # same graph instance replays: `first` must be unaffected
    assert engine.stats.captures == 1 and engine.stats.graph_replays == 2
    torch.cuda.current_stream().wait_event(second.done_event)
    _assert_same((first.boxes, first.logits, first.masks), _run(eager, x1), what="copy mode first")
    _assert_same((second.boxes, second.logits, second.masks), _run(eager, x2), what="copy mode second")


# ----------------------------------------------------------------------------- capture cache


def test_capture_cache_eviction_bounds_graphs_and_memory(model, eager):
    engine = TorchEngine(model, cuda_graphs=True, graph_cache_size=2)
    inputs = {b: _input(b, seed=40 + b) for b in (1, 2, 4)}
    refs = {b: _run(eager, x) for b, x in inputs.items()}

    def cycle() -> None:
        for b in (1, 2, 4):  # three sizes through a cache of two: every call evicts one
            _assert_same(_run(engine, inputs[b]), refs[b], what=f"batch {b}")

    cycle()
    torch.cuda.synchronize()
    keys = engine.cached_graph_keys()
    assert [k[0] for k in keys] == [2, 4], keys
    assert engine.stats.evictions == 1
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    for _ in range(3):
        cycle()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert engine.stats.captures == 3 + 3 * 3 and engine.stats.evictions == 1 + 3 * 3
    assert [k[0] for k in engine.cached_graph_keys()] == [2, 4]
    # Same live graphs as after the first cycle: evicted graphs gave their memory back.
    assert torch.cuda.memory_allocated() <= allocated + (1 << 20)
    assert torch.cuda.memory_reserved() <= reserved + (64 << 20)
    engine.close()
    assert engine.cached_graph_keys() == []


def test_partial_batches_replay_bucketed_graphs(model, eager):
    # a batch collection timeout hands over partial batches of changing sizes: they replay the graphs
    # of a few padded sizes, and the padding never leaks into the real rows
    engine = TorchEngine(model, cuda_graphs=True)
    _run(engine, _input(16, seed=60))
    for n in (13, 9, 5, 3, 16, 11, 6, 2, 1, 7):
        x = _input(n, seed=70 + n)
        _assert_same(_run(engine, x), _run(eager, x), atol=1e-4, what=f"batch {n}")
    assert sorted(k[0] for k in engine.cached_graph_keys()) == [1, 2, 4, 8, 16]
    summary = engine.graph_summary()
    assert summary["captures"] == 5 and summary["evictions"] == 0, summary
    assert engine.stats.eager_runs == 0, engine.describe()


# ----------------------------------------------------------------------------- concurrency


def _hammer(engine, x: torch.Tensor, ref: Triple, iterations: int, barrier, errors: List[str]) -> None:
    try:
        barrier.wait()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):  # each consumer thread on its own stream
            for i in range(iterations):
                out = _run(engine, x)
                for a, b in zip(out, ref):
                    if not torch.allclose(a, b, atol=ATOL_FP32, rtol=0):
                        errors.append(f"{engine.name} iteration {i}: max diff {(a - b).abs().max().item()}")
                        return
    except Exception as error:  # surfaced by the main thread
        errors.append(repr(error))


def _start_and_join(threads: List[threading.Thread]) -> None:
    # Inputs and references were made on this thread's stream; the workers use their own streams.
    torch.cuda.synchronize()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"


def test_two_models_and_two_threads_at_once():
    models = [build_random_model("rfdetr-seg-nano", device="cuda", seed=s) for s in (11, 12)]
    refs, engines, inputs = [], [], []
    for i, m in enumerate(models):
        x = _input(1, seed=50 + i)
        refs.append(_run(TorchEngine(m, cuda_graphs=False), x))
        engines.append(TorchEngine(m, cuda_graphs=True))  # captures happen inside the threads
        inputs.append(x)
    assert not torch.allclose(refs[0][1], refs[1][1])  # two different networks
    errors: List[str] = []
    barrier = threading.Barrier(2)
    threads = [
        threading.Thread(target=_hammer, args=(engines[i], inputs[i], refs[i], 50, barrier, errors))
        for i in range(2)
    ]
    _start_and_join(threads)
    assert not errors, errors
    assert all(e.stats.graph_replays == 50 and e.stats.eager_runs == 0 for e in engines)


def test_one_engine_shared_by_two_threads(model, eager):
    engine = TorchEngine(model, cuda_graphs=True)
    xs = [_input(1, seed=60), _input(1, seed=61)]
    refs = [_run(eager, x) for x in xs]
    errors: List[str] = []
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=_hammer, args=(engine, xs[i], refs[i], 50, barrier, errors)) for i in range(2)]
    _start_and_join(threads)
    assert not errors, errors
    assert engine.stats.calls == 100
    assert engine.stats.graph_replays + engine.stats.eager_runs == 100


# ----------------------------------------------------------------------------- memory and buffers


def test_memory_stable_over_10000_replays(model, eager):
    engine = TorchEngine(model, cuda_graphs=True)
    buffer = engine.input_buffer(1)
    x = _input(1, seed=70)
    buffer.copy_(x)
    ref = _run(eager, x)
    for _ in range(20):
        _call(engine, buffer).release(None)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for i in range(10_000):
        raw = _call(engine, buffer)
        if i % 1000 == 0:
            torch.cuda.current_stream().wait_event(raw.done_event)
            _assert_same((raw.boxes.clone(), raw.logits.clone(), raw.masks.clone()), ref, what=f"replay {i}")
        raw.release(None)
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - baseline
    assert grown <= (1 << 20), f"memory_allocated grew by {grown} bytes over 10,000 replays"
    assert engine.stats.eager_runs == 0 and engine.stats.captures == 1, engine.describe()
    assert engine.stats.input_copies == 0


def test_input_buffer_written_in_place_without_copy(model, eager):
    engine = TorchEngine(model, cuda_graphs=True)
    x = _input(1, seed=80)
    ref = _run(eager, x)
    buffer = engine.input_buffer(1)
    buffer.zero_()
    torch.cuda.synchronize()
    producer = torch.cuda.Stream()
    with torch.cuda.stream(producer):
        torch.cuda._sleep(50_000_000)  # a slow producer: the engine must wait for it on the GPU
        buffer.copy_(x)
        ready = torch.cuda.Event()
        ready.record(producer)
    out = _run(engine, buffer, event=ready)
    _assert_same(out, ref, what="in-place input")
    assert engine.stats.input_copies == 0
    assert engine.input_buffer(1).data_ptr() == buffer.data_ptr()
    _run(engine, x.clone())  # a foreign tensor is copied in
    assert engine.stats.input_copies == 1
    # eager engines read a CUDA batch tensor directly
    copies = eager.stats.input_copies
    _run(eager, x)
    assert eager.stats.input_copies == copies


# ----------------------------------------------------------------------------- other engines (when present)


def test_onnx_engine_cuda_iobinding_matches_cpu(tmp_path, tiny_onnx_bytes):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider here")
    from inference_fastpath.adapters.engine.onnx_engine import OnnxEngine

    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_onnx_bytes())
    gpu = OnnxEngine.from_path(str(path), device="cuda")
    cpu = OnnxEngine.from_path(str(path), device="cpu")
    assert gpu.device.type == "cuda" and cpu.device.type == "cpu"
    x = torch.randn(3, 3, 8, 8)
    ours = _run(gpu, x.cuda())
    ref = materialize_outputs(cpu(PreprocessedBatch(tensor=x, metadata=[])))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)


def test_tensorrt_engine_graph_equals_eager(tmp_path, tiny_onnx_bytes):
    trt = pytest.importorskip("tensorrt")
    from inference_fastpath.adapters.engine.tensorrt_engine import BatchProfile, TensorRTEngine

    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt.Logger(trt.Logger.WARNING))
    assert parser.parse(tiny_onnx_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))
    config.add_optimization_profile(profile)
    plan = tmp_path / "engine.plan"
    plan.write_bytes(bytes(builder.build_serialized_network(network, config)))

    eager_trt = TensorRTEngine.from_plan(str(plan), cuda_graphs=False)
    graph_trt = TensorRTEngine.from_plan(str(plan), cuda_graphs=True)
    assert graph_trt.profile == BatchProfile(1, 2, 4)
    for batch in (1, 3, 6):  # 6 exceeds the profile: chunked eagerly with a logged reason
        x = torch.randn(batch, 3, 8, 8, device="cuda")
        ref = _run(eager_trt, x)
        for _ in range(2):
            _assert_same(_run(graph_trt, x), ref, atol=1e-6, what=f"trt batch {batch}")
    assert graph_trt.stats.captures == 2 and graph_trt.stats.eager_runs == 2, graph_trt.describe()

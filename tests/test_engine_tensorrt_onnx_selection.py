"""Engine stage on the CPU: the TensorRT engine's logic against a fake engine (TensorRT itself never
runs here), the ONNX Runtime engine on a tiny generated graph, and the choice between engines.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from inference_fastpath.adapters import selection
from inference_fastpath.adapters.engine.reference import ReferenceEngine
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
from inference_fastpath.adapters.contracts import PreprocessedBatch


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

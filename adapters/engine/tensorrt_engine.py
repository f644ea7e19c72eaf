"""TensorRT 10 engine for TRT plan packages (``engine.plan`` + ``trt_config.json``).

The TensorRT-specific part is deliberately thin: :class:`TensorRTEngine` deserialises or borrows an
``ICudaEngine``, creates execution contexts and calls ``execute_async_v3`` on the engine stream.
Everything else - reading the I/O tensors (``num_io_tensors`` / ``get_tensor_name`` /
``get_tensor_mode``), the batch profile (static, or dynamic min/opt/max from the engine or the
package's ``trt_config.json``), padding and chunking batches to that profile, concrete input shapes,
and binding torch buffers to a context (``set_input_shape`` + ``set_tensor_address``) - lives in
pure functions that only talk to duck-typed engine/context objects, so they are unit tested on the
CPU with fakes (tests/test_engine_tensorrt_onnx_selection.py). ``tensorrt`` is imported lazily.

CUDA graphs go through ``graphs.py``'s shared cache: one execution context per captured graph, because a context
reallocates its internal scratch when its input shape changes, which would invalidate the addresses
baked into graphs captured earlier with that context. The eager path has its own context.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from inference_fastpath.adapters.engine.base import (
    GRAPH_CACHE_SIZE,
    EngineBase,
    OutputTriple,
    model_input_hw,
)
from inference_fastpath.adapters.engine.exported_models import order_output_names, plan_batch_chunks
from inference_fastpath.adapters.engine.graphs import GraphKey

LOGGER = logging.getLogger(__name__)

_TRT_TO_TORCH: Dict[str, torch.dtype] = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
}


# ---------------------------------------------------------------------------- pure logic


@dataclass(frozen=True)
class TensorSpec:
    name: str
    is_input: bool
    dtype: torch.dtype
    shape: Tuple[int, ...]  # -1 marks a dynamic dimension


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes an engine accepts: static when ``min == max``."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"invalid batch profile min={self.min} opt={self.opt} max={self.max}")

    @property
    def is_static(self) -> bool:
        return self.min == self.max

    def accepts(self, batch_size: int) -> bool:
        return self.min <= batch_size <= self.max

    def physical_batch(self, batch_size: int) -> int:
        """Rows one forward runs for ``batch_size`` frames: padded up to ``min``; unchanged above ``max``
        (such batches are chunked)."""
        return max(batch_size, self.min) if batch_size <= self.max else batch_size

    def chunks(self, batch_size: int) -> List[Tuple[int, int, int]]:
        return plan_batch_chunks(batch_size, self.min, self.max)


def enum_name(value: Any) -> str:
    """``TensorIOMode.INPUT`` -> ``"INPUT"`` for TensorRT enums and for test fakes."""
    name = getattr(value, "name", None)
    return str(name if name is not None else value).split(".")[-1].upper()


def trt_dtype_to_torch(dtype: Any) -> torch.dtype:
    name = enum_name(dtype)
    if name not in _TRT_TO_TORCH:
        raise ValueError(f"unsupported TensorRT data type {dtype}")
    return _TRT_TO_TORCH[name]


def read_io_specs(engine: Any) -> Tuple[List[TensorSpec], List[TensorSpec]]:
    """(inputs, outputs) of an engine, in engine order."""
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = enum_name(engine.get_tensor_mode(name))
        if mode not in ("INPUT", "OUTPUT"):
            continue
        spec = TensorSpec(
            name=name,
            is_input=mode == "INPUT",
            dtype=trt_dtype_to_torch(engine.get_tensor_dtype(name)),
            shape=tuple(int(d) for d in engine.get_tensor_shape(name)),
        )
        (inputs if spec.is_input else outputs).append(spec)
    return inputs, outputs


def profile_from_trt_config(config: Any) -> BatchProfile:
    """BatchProfile from a parsed ``trt_config.json`` (inference-models' ``TRTConfig`` or a dict)."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    static = get("static_batch_size")
    if static is not None:
        return BatchProfile(int(static), int(static), int(static))
    lo, opt, hi = get("dynamic_batch_size_min"), get("dynamic_batch_size_opt"), get("dynamic_batch_size_max")
    if None in (lo, opt, hi):
        raise ValueError("trt_config has neither static_batch_size nor dynamic_batch_size_min/opt/max")
    return BatchProfile(int(lo), int(opt), int(hi))


def batch_profile(engine: Any, input_name: str, profile_index: int = 0) -> BatchProfile:
    """The engine's own batch limits for ``input_name`` (what it was built with)."""
    shape = tuple(int(d) for d in engine.get_tensor_shape(input_name))
    if shape and shape[0] > 0:
        return BatchProfile(shape[0], shape[0], shape[0])
    lo, opt, hi = engine.get_tensor_profile_shape(input_name, profile_index)
    return BatchProfile(int(lo[0]), int(opt[0]), int(hi[0]))


def concrete_input_shape(
    spec_shape: Sequence[int], batch_size: int, hw: Tuple[int, int]
) -> Tuple[int, ...]:
    """Fills the dynamic dims of an NCHW input: batch first, then H and W; static dims must match."""
    wanted = (batch_size, spec_shape[1] if spec_shape[1] > 0 else 3, hw[0], hw[1])
    out = []
    for declared, value in zip(spec_shape, wanted):
        if declared > 0 and declared != value:
            raise ValueError(f"input shape {wanted} does not fit the engine's {tuple(spec_shape)}")
        out.append(value)
    return tuple(out)


def bind_io(
    context: Any,
    input_name: str,
    input_tensor: torch.Tensor,
    output_specs: Sequence[TensorSpec],
) -> Dict[str, torch.Tensor]:
    """Points a context at ``input_tensor`` and at freshly allocated output tensors.

    Returns the outputs by name; they stay bound to the context until it is rebound.
    """
    if not input_tensor.is_contiguous():
        raise ValueError("TensorRT inputs must be contiguous")
    if not context.set_input_shape(input_name, tuple(input_tensor.shape)):
        raise RuntimeError(f"TensorRT rejected input shape {tuple(input_tensor.shape)} for {input_name}")
    if not context.set_tensor_address(input_name, input_tensor.data_ptr()):
        raise RuntimeError(f"TensorRT rejected the address of {input_name}")
    outputs: Dict[str, torch.Tensor] = {}
    for spec in output_specs:
        shape = tuple(int(d) for d in context.get_tensor_shape(spec.name))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"output {spec.name} has unresolved shape {shape}")
        tensor = torch.empty(shape, dtype=spec.dtype, device=input_tensor.device)
        if not context.set_tensor_address(spec.name, tensor.data_ptr()):
            raise RuntimeError(f"TensorRT rejected the address of {spec.name}")
        outputs[spec.name] = tensor
    return outputs


def select_io(
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    output_names: Optional[Sequence[str]] = None,
) -> Tuple[TensorSpec, Tuple[TensorSpec, TensorSpec, TensorSpec]]:
    """The single input and the (boxes, logits, masks) outputs of an RF-DETR segmentation engine."""
    if len(inputs) != 1:
        raise ValueError(f"expected 1 input, the engine has {[s.name for s in inputs]}")
    if len(outputs) != 3:
        raise ValueError(f"expected 3 outputs, the engine has {[s.name for s in outputs]}")
    by_name = {s.name: s for s in outputs}
    names = tuple(output_names) if output_names else order_output_names([s.name for s in outputs])
    return inputs[0], tuple(by_name[n] for n in names)  # type: ignore[return-value]


def read_trt_config(package_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(package_dir, "trt_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- TensorRT part


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        try:
            import tensorrt_lean as trt  # runtime-only wheel
        except ImportError as error:
            raise ImportError("the TensorRT engine needs the `tensorrt` Python package") from error
    return trt


def deserialize_plan(plan_path: str, engine_host_code_allowed: bool = False) -> Tuple[Any, Any]:
    """(ICudaEngine, IRuntime) from a serialized plan; keep the runtime alive with the engine."""
    trt = import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if hasattr(runtime, "engine_host_code_allowed"):
        runtime.engine_host_code_allowed = engine_host_code_allowed
    with open(plan_path, "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {plan_path} (version / GPU mismatch?)")
    return engine, runtime


class TensorRTEngine(EngineBase):
    """Runs a TensorRT engine on torch buffers, with CUDA-graph replay per batch size."""

    name = "tensorrt"
    supports_cuda_graphs = True

    def __init__(
        self,
        trt_engine: Any,
        *,
        device: Optional[Union[str, torch.device]] = None,
        output_names: Optional[Sequence[str]] = None,
        profile: Optional[BatchProfile] = None,
        input_hw: Optional[Tuple[int, int]] = None,
        cuda_graphs: bool = True,
        graph_cache_size: int = GRAPH_CACHE_SIZE,
        max_inflight: int = 2,
        warmup_iters: int = 2,
        output_mode: str = "borrow",
        keepalive: Any = None,
    ) -> None:
        inputs, outputs = read_io_specs(trt_engine)
        self._input_spec, self._output_specs = select_io(inputs, outputs, output_names)
        self._trt_engine = trt_engine
        self._keepalive = keepalive  # e.g. the IRuntime that deserialized the engine
        self.profile = profile or batch_profile(trt_engine, self._input_spec.name)
        shape = self._input_spec.shape
        if input_hw is None and len(shape) == 4 and shape[2] > 0 and shape[3] > 0:
            input_hw = (shape[2], shape[3])
        if input_hw is None:
            raise ValueError("input_hw is required for an engine with dynamic spatial input dims")
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if dev.type != "cuda":
            raise ValueError("TensorRT runs on CUDA devices only")
        super().__init__(
            device=dev,
            input_hw=input_hw,
            input_dtype=self._input_spec.dtype,
            cuda_graphs=cuda_graphs,
            graph_cache_size=graph_cache_size,
            max_inflight=max_inflight,
            warmup_iters=warmup_iters,
            output_mode=output_mode,
        )
        with torch.cuda.device(self.device):
            self._eager_context = trt_engine.create_execution_context()

    # -- constructors

    @classmethod
    def from_plan(cls, plan_path: str, *, engine_host_code_allowed: bool = False, **kwargs: Any) -> "TensorRTEngine":
        device = torch.device(kwargs.get("device") or "cuda")
        with torch.cuda.device(device):
            engine, runtime = deserialize_plan(plan_path, engine_host_code_allowed)
        return cls(engine, keepalive=runtime, **kwargs)

    @classmethod
    def from_package(cls, package_dir: str, **kwargs: Any) -> "TensorRTEngine":
        """A TRT model package dir; ``trt_config.json`` must agree with the plan's own profile."""
        engine = cls.from_plan(os.path.join(package_dir, "engine.plan"), **kwargs)
        config = read_trt_config(package_dir)
        if config is not None:
            declared = profile_from_trt_config(config)
            if (declared.min, declared.max) != (engine.profile.min, engine.profile.max):
                LOGGER.warning(
                    "trt_config.json declares batch %s..%s but the plan accepts %s..%s; using the plan's",
                    declared.min, declared.max, engine.profile.min, engine.profile.max,
                )
        return engine

    @classmethod
    def from_inference_model(cls, model: Any, **kwargs: Any) -> "TensorRTEngine":
        """Reuses the ``ICudaEngine`` an inference-models TRT model already deserialized."""
        kwargs.setdefault("device", getattr(model, "_device", None))
        kwargs.setdefault("input_hw", model_input_hw(model))
        kwargs.setdefault("output_names", getattr(model, "_output_names", None))
        return cls(model._engine, keepalive=model, **kwargs)

    # -- EngineBase hooks

    def _physical_batch(self, batch_size: int) -> int:
        return self.profile.physical_batch(batch_size)

    def _batch_chunks(self, n: int) -> List[Tuple[int, int, int]]:
        return self.profile.chunks(n)

    def _graph_unsupported_reason(self, key: GraphKey) -> Optional[str]:
        if not self.profile.accepts(key[0]):
            return (
                f"batch {key[0]} is outside the TensorRT profile {self.profile.min}..{self.profile.max}: "
                "running eagerly in chunks"
            )
        return None

    def _forward(self, x: torch.Tensor) -> OutputTriple:
        outputs = bind_io(self._eager_context, self._input_spec.name, x.contiguous(), self._output_specs)
        self._execute(self._eager_context)
        return tuple(outputs[s.name] for s in self._output_specs)  # type: ignore[return-value]

    def _graph_forward_fn(
        self, key: GraphKey, static_input: torch.Tensor
    ) -> Tuple[Callable[[], Sequence[torch.Tensor]], Any]:
        context = self._trt_engine.create_execution_context()
        outputs = bind_io(context, self._input_spec.name, static_input, self._output_specs)
        ordered = tuple(outputs[s.name] for s in self._output_specs)

        def run() -> Sequence[torch.Tensor]:
            self._execute(context)
            return ordered

        return run, context

    def _execute(self, context: Any) -> None:
        stream = torch.cuda.current_stream(self.device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

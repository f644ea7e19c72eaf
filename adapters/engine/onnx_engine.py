"""ONNX Runtime engine: the portable fallback for ONNX model packages.

It reuses the ``InferenceSession`` an inference-models ONNX model already holds (``_session``, input
name ``_input_name``, batch limits ``_min_batch_size`` / ``_max_batch_size``), so the weights are
not loaded twice. With a CUDA-capable execution provider and a CUDA device the input and outputs are
bound in place with IO binding (torch tensors on the device, no host round trip); otherwise it runs
on the CPU execution provider with numpy arrays.

ONNX Runtime executes on its own CUDA stream and its ``run`` returns when the results are ready, so
before ``run`` the engine stream is synchronised (host wait) to make the input copy / producer's
writes visible. That host sync is the price of portability; the TensorRT and torch engines avoid it.
No CUDA graphs here (ORT has its own graph option, configured at session creation).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from inference_fastpath.adapters.engine.base import (
    EngineBase,
    OutputTriple,
    model_input_hw,
)
from inference_fastpath.adapters.engine.exported_models import order_output_names, plan_batch_chunks

LOGGER = logging.getLogger(__name__)

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")

_ORT_TO_TORCH: Dict[str, torch.dtype] = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
    "tensor(int32)": torch.int32,
    "tensor(int64)": torch.int64,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}
_TORCH_TO_NUMPY: Dict[torch.dtype, Any] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


def ort_type_to_torch(ort_type: str) -> torch.dtype:
    if ort_type not in _ORT_TO_TORCH:
        raise ValueError(f"unsupported ONNX tensor type {ort_type}")
    return _ORT_TO_TORCH[ort_type]


def static_dim(value: Any) -> Optional[int]:
    """An ONNX dimension as an int, or None when it is symbolic / unknown."""
    return int(value) if isinstance(value, int) and value > 0 else None


def resolve_output_shape(shape: Sequence[Any], batch_size: int) -> Optional[Tuple[int, ...]]:
    """Concrete output shape for a batch: dim 0 is the batch; None if any other dim is symbolic."""
    dims = [batch_size]
    for value in list(shape)[1:]:
        d = static_dim(value)
        if d is None:
            return None
        dims.append(d)
    return tuple(dims)


class OnnxEngine(EngineBase):
    """Runs an ONNX Runtime session on static torch buffers (IO binding on CUDA)."""

    name = "onnx"
    supports_cuda_graphs = False

    def __init__(
        self,
        session: Any,
        *,
        device: Optional[Union[str, torch.device]] = None,
        input_name: Optional[str] = None,
        input_hw: Optional[Tuple[int, int]] = None,
        min_batch: Optional[int] = None,
        max_batch: Optional[int] = None,
        cuda_graphs: bool = False,
        output_mode: str = "borrow",
    ) -> None:
        self._session = session
        inputs = session.get_inputs()
        spec = next((i for i in inputs if i.name == input_name), inputs[0]) if input_name else inputs[0]
        self._input_name = spec.name
        outputs = session.get_outputs()
        self._output_names = order_output_names([o.name for o in outputs])
        self._output_shapes = {o.name: list(o.shape) for o in outputs}
        self._output_dtypes = {o.name: ort_type_to_torch(o.type) for o in outputs}
        self.providers = list(session.get_providers())
        self._gpu_session = any(p in GPU_PROVIDERS for p in self.providers)
        dev = torch.device(device) if device is not None else None
        if dev is None:
            dev = torch.device("cuda") if self._gpu_session and torch.cuda.is_available() else torch.device("cpu")
        if dev.type == "cuda" and not self._gpu_session:
            LOGGER.warning("onnx engine: session has no GPU provider (%s); running on cpu", self.providers)
            dev = torch.device("cpu")
        batch_dim = static_dim(spec.shape[0]) if len(spec.shape) else None
        self._min_batch = min_batch if min_batch is not None else batch_dim
        self._max_batch = max_batch if max_batch is not None else batch_dim
        if input_hw is None and len(spec.shape) == 4:
            h, w = static_dim(spec.shape[2]), static_dim(spec.shape[3])
            input_hw = (h, w) if h and w else None
        super().__init__(
            device=dev,
            input_hw=input_hw or (312, 312),
            input_dtype=ort_type_to_torch(spec.type),
            cuda_graphs=cuda_graphs,
            output_mode=output_mode,
        )

    @classmethod
    def from_inference_model(cls, model: Any, **kwargs: Any) -> "OnnxEngine":
        """Wraps an inference-models ONNX model (``RFDetrForInstanceSegmentationOnnx``)."""
        return cls(
            model._session,
            device=kwargs.pop("device", getattr(model, "_device", None)),
            input_name=getattr(model, "_input_name", None),
            input_hw=kwargs.pop("input_hw", model_input_hw(model)),
            min_batch=getattr(model, "_min_batch_size", None),
            max_batch=getattr(model, "_max_batch_size", None),
            **kwargs,
        )

    @classmethod
    def from_path(
        cls, onnx_path: str, *, device: Optional[Union[str, torch.device]] = None, **kwargs: Any
    ) -> "OnnxEngine":
        """Creates a session for an ``.onnx`` file: CUDA EP when asked and available, else CPU EP."""
        import onnxruntime

        want_cuda = (device is None and torch.cuda.is_available()) or (
            device is not None and torch.device(device).type == "cuda"
        )
        providers: List[Any] = ["CPUExecutionProvider"]
        if want_cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            index = torch.device(device).index if device is not None else None
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index or 0}))
        session = onnxruntime.InferenceSession(onnx_path, providers=providers)
        return cls(session, device=device, **kwargs)

    def _batch_chunks(self, n: int) -> List[Tuple[int, int, int]]:
        return plan_batch_chunks(n, self._min_batch, self._max_batch)

    def _forward(self, x: torch.Tensor) -> OutputTriple:
        if x.is_cuda:
            return self._run_with_iobinding(x.contiguous())
        arrays = self._session.run(list(self._output_names), {self._input_name: x.contiguous().numpy()})
        return tuple(torch.from_numpy(a) for a in arrays)  # type: ignore[return-value]

    def _run_with_iobinding(self, x: torch.Tensor) -> OutputTriple:
        device_id = x.device.index or 0
        binding = self._session.io_binding()
        binding.bind_input(
            name=self._input_name,
            device_type="cuda",
            device_id=device_id,
            element_type=_TORCH_TO_NUMPY[x.dtype],
            shape=tuple(x.shape),
            buffer_ptr=x.data_ptr(),
        )
        results: List[Optional[torch.Tensor]] = []
        for name in self._output_names:
            shape = resolve_output_shape(self._output_shapes[name], x.shape[0])
            if shape is None:  # symbolic dims: let ORT allocate, fetched through DLPack below
                binding.bind_output(name=name, device_type="cuda", device_id=device_id)
                results.append(None)
                continue
            out = torch.empty(shape, dtype=self._output_dtypes[name], device=x.device)
            binding.bind_output(
                name=name,
                device_type="cuda",
                device_id=device_id,
                element_type=_TORCH_TO_NUMPY[out.dtype],
                shape=shape,
                buffer_ptr=out.data_ptr(),
            )
            results.append(out)
        # ORT reads on its own stream: the input must be complete on ours first (host wait).
        torch.cuda.current_stream(x.device).synchronize()
        self._session.run_with_iobinding(binding)
        if any(r is None for r in results):
            bound = binding.get_outputs()
            for i, value in enumerate(bound):
                if results[i] is None:
                    results[i] = _ortvalue_to_torch(value, x.device)
        return tuple(results)  # type: ignore[return-value]


def _ortvalue_to_torch(value: Any, device: torch.device) -> torch.Tensor:
    native = getattr(value, "_ortvalue", value)  # the C object carries to_dlpack in most builds
    if hasattr(native, "to_dlpack"):
        return torch.utils.dlpack.from_dlpack(native.to_dlpack())
    return torch.from_numpy(value.numpy()).to(device)

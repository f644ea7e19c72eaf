"""Which engine runs a model: ``select_engine(requested, cuda_graphs, model)``.

Rules:

* ``auto``: TensorRT for a TRT package, the torch engine for a torch package (CUDA graphs when on a
  GPU, eager on the CPU), ONNX Runtime for an ONNX package; if that engine cannot be built, the
  model's own ``forward`` (the ``reference`` engine) - ``auto`` never raises.
* an explicit ``tensorrt`` / ``torch`` / ``onnx`` that the package cannot serve (a torch package has
  no TensorRT plan, a TRT package has no torch weights, ...) or that fails to build falls back the
  same way, and says why.
* ``cuda_graphs=True`` where graphs cannot run (CPU, ONNX, reference) runs eagerly, and says why.

The second return value is ``None`` when the request was honoured exactly, else a human-readable
reason (several joined with ``"; "``). Only an unknown ``requested`` value raises (a caller bug).
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple, Union

import torch

from inference_fastpath.adapters.engines.base import EngineBase, ModelForwardEngine

LOGGER = logging.getLogger(__name__)

ENGINE_CHOICES = ("auto", "tensorrt", "torch", "onnx")


def detect_backend(model: Any) -> str:
    """``"tensorrt"``, ``"torch"``, ``"onnx"`` or ``"unknown"`` for an inference-models model."""
    if hasattr(model, "_engine") and hasattr(model, "_execution_context"):
        return "tensorrt"
    if hasattr(model, "_session"):
        return "onnx"
    if isinstance(model, torch.nn.Module) or isinstance(getattr(model, "_model", None), torch.nn.Module):
        return "torch"
    return "unknown"


def select_engine(
    requested: str,
    cuda_graphs: bool,
    model: Any,
    *,
    precision: str = "fp32",
    device: Optional[Union[str, torch.device]] = None,
    graph_cache_size: int = 4,
    max_inflight: int = 2,
    output_mode: str = "borrow",
) -> Tuple[EngineBase, Optional[str]]:
    """Builds the engine for ``model``; returns ``(engine, reason_or_None)``."""
    if requested not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {list(ENGINE_CHOICES)}, got {requested!r}")
    reasons: List[str] = []
    try:
        backend = detect_backend(model)
    except Exception as error:  # a very odd model object: still answer
        backend = "unknown"
        reasons.append(f"could not tell the model's backend ({error!r})")
    native = backend if backend in ("tensorrt", "torch", "onnx") else None
    if native is None:
        reasons.append(f"unrecognised model type {type(model).__name__}: using its own forward")
    if requested != "auto" and requested != native:
        reasons.append(
            f"engine '{requested}' is not possible for a {backend} model package "
            f"(it has no {_artifact(requested)})"
        )
    order = [native] if native is not None else []
    if "reference" not in order:
        order.append("reference")
    for choice in order:
        try:
            engine, notes = _build(
                choice,
                model,
                cuda_graphs=cuda_graphs,
                precision=precision,
                device=device,
                graph_cache_size=graph_cache_size,
                max_inflight=max_inflight,
                output_mode=output_mode,
            )
        except Exception as error:
            reasons.append(f"{choice} engine could not be built ({type(error).__name__}: {error})")
            LOGGER.warning("engine selection: %s engine could not be built", choice, exc_info=True)
            continue
        if choice == "reference" and native is not None:
            reasons.append("running the model's own forward instead")
        reasons.extend(notes)
        reason = "; ".join(reasons) or None
        if reason:
            LOGGER.warning("engine selection (requested %s): %s", requested, reason)
        return engine, reason
    raise RuntimeError("no engine could be built: " + "; ".join(reasons))  # unreachable in practice


def _artifact(choice: str) -> str:
    return {"tensorrt": "TensorRT plan", "torch": "torch weights", "onnx": "ONNX graph"}[choice]


def _build(
    choice: str,
    model: Any,
    *,
    cuda_graphs: bool,
    precision: str,
    device: Optional[Union[str, torch.device]],
    graph_cache_size: int,
    max_inflight: int,
    output_mode: str,
) -> Tuple[EngineBase, List[str]]:
    notes: List[str] = []
    graph_kwargs = dict(graph_cache_size=graph_cache_size, max_inflight=max_inflight, output_mode=output_mode)
    if choice == "torch":
        from inference_fastpath.adapters.engines.torch_engine import TorchEngine

        dev = torch.device(device) if device is not None else _model_device(model)
        if dev.type != "cuda" and precision != "fp32":
            notes.append(f"precision {precision} needs a CUDA device: running fp32 on {dev}")
            precision = "fp32"
        engine: EngineBase = TorchEngine(
            model, precision=precision, cuda_graphs=cuda_graphs, device=dev, **graph_kwargs
        )
    elif choice == "tensorrt":
        from inference_fastpath.adapters.engines.tensorrt_engine import TensorRTEngine

        if precision != "fp32":
            notes.append(f"precision {precision} ignored: a TensorRT plan's precision is fixed when it is built")
        kwargs = {} if device is None else {"device": device}
        engine = TensorRTEngine.from_inference_model(model, cuda_graphs=cuda_graphs, **graph_kwargs, **kwargs)
    elif choice == "onnx":
        from inference_fastpath.adapters.engines.onnx_engine import OnnxEngine

        if precision != "fp32":
            notes.append(f"precision {precision} ignored: the ONNX graph's precision is fixed")
        kwargs = {} if device is None else {"device": device}
        engine = OnnxEngine.from_inference_model(model, cuda_graphs=cuda_graphs, output_mode=output_mode, **kwargs)
    else:
        if precision != "fp32":
            notes.append(f"precision {precision} ignored by the model's own forward")
        engine = ModelForwardEngine(model, device=device, cuda_graphs=cuda_graphs, output_mode=output_mode)
    if cuda_graphs and engine.graph_fallback_reason is not None:
        notes.append(f"cuda_graphs: {engine.graph_fallback_reason}")
    return engine, notes


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "_device", None)
    if device is not None:
        return torch.device(device)
    network = model if isinstance(model, torch.nn.Module) else getattr(model, "_model", None)
    try:
        return next(network.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

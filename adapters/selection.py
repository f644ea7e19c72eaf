"""Options -> the three stages, with an explicit reason wherever a fast stage is not used.

``auto`` never fails: it takes the fast stage when the machine and the model package allow it and the
reference stage otherwise. An explicit fast choice that cannot run falls back the same way, and the
reason is reported (the block logs it once per step). A fast stage that is selected still checks each
call and hands the calls it cannot reproduce to its reference twin (``adapters/fallback.py``).

Engine rules:

* ``auto``: TensorRT for a TRT package, the torch engine for a torch package (CUDA graphs when on a
  GPU, eager on the CPU), ONNX Runtime for an ONNX package; if that engine cannot be built, the
  model's own ``forward`` (the ``reference`` engine).
* an explicit ``tensorrt`` / ``torch`` / ``onnx`` that the package cannot serve (a torch package has
  no TensorRT plan, ...) or that fails to build falls back the same way, and says why.
* ``cuda_graphs=True`` where graphs cannot run (CPU, ONNX, reference) runs eagerly, and says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import torch

from inference_fastpath.adapters.contracts import PostprocessRequest
from inference_fastpath.adapters.engine.base import GRAPH_CACHE_SIZE, EngineBase
from inference_fastpath.adapters.engine.onnx_engine import OnnxEngine
from inference_fastpath.adapters.engine.reference import ReferenceEngine
from inference_fastpath.adapters.engine.tensorrt_engine import TensorRTEngine
from inference_fastpath.adapters.engine.torch_engine import TorchEngine
from inference_fastpath.adapters.fallback import FallbackStage
from inference_fastpath.adapters.model_loading import LoadedModel
from inference_fastpath.adapters.options import FastpathOptions
from inference_fastpath.adapters.postprocess.reference import ReferencePostprocess
from inference_fastpath.adapters.preprocess.reference import ReferencePreprocess
from inference_fastpath.kernels.triton_runtime import unavailable_reason

# The fast stages need triton; without it (or with a broken install) the reference twins run.
try:
    from inference_fastpath.adapters.preprocess.triton import TritonPreprocess
except Exception as error:  # noqa: BLE001 - ImportError, a half-installed triton, a driver problem...
    TritonPreprocess = None
    _TRITON_PREPROCESS_MISSING = f"the Triton preprocess does not import ({type(error).__name__}: {error})"
try:
    from inference_fastpath.adapters.postprocess.fused import FusedPostprocess
except Exception as error:  # noqa: BLE001
    FusedPostprocess = None
    _FUSED_POSTPROCESS_MISSING = f"the fused postprocess does not import ({type(error).__name__}: {error})"

LOGGER = logging.getLogger("inference_fastpath")


@dataclass(frozen=True)
class StageChoice:
    stage: str  # "preprocess" | "engine" | "postprocess"
    requested: str
    selected: str
    fallback_reason: Optional[str] = None
    note: Optional[str] = None  # a selected fast stage's stated difference from the reference, if any


@dataclass(frozen=True)
class SelectedStages:
    """The three stages a runner runs, and how each was chosen."""

    preprocess: Any
    engine: EngineBase
    postprocess: Any
    choices: Tuple[StageChoice, StageChoice, StageChoice]


def select_stages(options: FastpathOptions, loaded: LoadedModel) -> SelectedStages:
    """Build every stage ``options`` asks for on ``loaded``'s device.

    Example:
        >>> stages = select_stages(FastpathOptions(), loaded)  # doctest: +SKIP
        >>> [choice.selected for choice in stages.choices]  # doctest: +SKIP
        ['triton', 'torch', 'fused']
    """
    preprocess, pre = select_preprocess(options, loaded)
    engine, eng = select_engine(options, loaded)
    postprocess, post = select_postprocess(options, loaded)
    return SelectedStages(preprocess, engine, postprocess, (pre, eng, post))


def triton_runnable(device: torch.device, requested: str) -> Optional[str]:
    """None when Triton kernels should run for ``device``, else the reason they will not.

    ``auto`` takes Triton on CUDA only; an explicit request may also run under the CPU interpreter
    (``TRITON_INTERPRET=1``), which is how CI checks the kernels' numerics.
    """
    if requested == "auto" and device.type != "cuda":
        return "`auto` takes the Triton stages on a CUDA device only (an explicit choice also runs them with TRITON_INTERPRET=1)"
    return unavailable_reason(device)


def _build_fast(requested: str, device: torch.device, stage_class, missing: str, make):
    """(stage, None) when the Triton stage can run and builds, else (None, reason)."""
    reason = triton_runnable(device, requested)
    if reason is not None:
        return None, reason
    if stage_class is None:
        return None, missing
    try:
        return make(stage_class), None
    except Exception as error:  # noqa: BLE001 - a stage that cannot build falls back, with the reason
        return None, f"{stage_class.__name__} could not be built: {type(error).__name__}: {error}"


def select_preprocess(options: FastpathOptions, loaded: LoadedModel) -> Tuple[Any, StageChoice]:
    reference = ReferencePreprocess(loaded.model)
    if options.preprocess == "reference":
        return reference, StageChoice("preprocess", "reference", "reference")

    def make(stage_class):
        config = getattr(loaded.model, "_inference_config", None)
        if config is None:
            raise ValueError(f"the {loaded.backend} model exposes no inference config to plan the resize from")
        return stage_class(
            network_input=config.network_input,
            image_pre_processing=config.image_pre_processing,
            device=loaded.device,
            dtype=_engine_input_dtype(options),
            cuda_graphs=options.cuda_graphs,
        )

    missing = None if TritonPreprocess is not None else _TRITON_PREPROCESS_MISSING
    stage, reason = _build_fast(options.preprocess, loaded.device, TritonPreprocess, missing, make)
    if stage is None:
        return reference, StageChoice("preprocess", options.preprocess, "reference", reason)
    return FallbackStage("preprocess", stage, reference), StageChoice("preprocess", options.preprocess, "triton")


def _engine_input_dtype(options: FastpathOptions) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[options.precision]


def select_engine(options: FastpathOptions, loaded: LoadedModel) -> Tuple[EngineBase, StageChoice]:
    try:
        engine, reason = build_engine(
            requested=options.engine, cuda_graphs=options.cuda_graphs, model=loaded.model,
            precision=options.precision,
        )
        return engine, StageChoice("engine", options.engine, engine.name, reason)
    except Exception as error:  # noqa: BLE001 - `auto` never fails
        reason = f"engine selection failed: {type(error).__name__}: {error}"
    return ReferenceEngine(loaded.model), StageChoice("engine", options.engine, "reference", reason)


def select_postprocess(options: FastpathOptions, loaded: LoadedModel) -> Tuple[Any, StageChoice]:
    num_classes = len(loaded.class_names)
    re_mapping = getattr(loaded.model, "_classes_re_mapping", None)
    reference = ReferencePostprocess(num_classes=num_classes, classes_re_mapping=re_mapping)
    if options.postprocess == "reference":
        return reference, StageChoice("postprocess", "reference", "reference")
    missing = None if FusedPostprocess is not None else _FUSED_POSTPROCESS_MISSING
    stage, reason = _build_fast(
        options.postprocess, loaded.device, FusedPostprocess, missing,
        lambda stage_class: stage_class(
            num_classes=num_classes, classes_re_mapping=re_mapping, device=loaded.device,
            cuda_graphs=options.cuda_graphs,
        ),
    )
    if stage is None:
        return reference, StageChoice("postprocess", options.postprocess, "reference", reason)
    if not stage.accumulation().usable:  # known now for every call: say so once, at selection
        reason = stage.unsupported_reason([], PostprocessRequest(0.5, None, "dense"))
        return reference, StageChoice("postprocess", options.postprocess, "reference", reason)
    return FallbackStage("postprocess", stage, reference), StageChoice(
        "postprocess", options.postprocess, "fused", note=stage.precision_note
    )


# ----------------------------------------------------------------------------- engines

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


def build_engine(
    requested: str,
    cuda_graphs: bool,
    model: Any,
    *,
    precision: str = "fp32",
    device: Optional[Union[str, torch.device]] = None,
    graph_cache_size: int = GRAPH_CACHE_SIZE,
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
        dev = torch.device(device) if device is not None else _model_device(model)
        if dev.type != "cuda" and precision != "fp32":
            notes.append(f"precision {precision} needs a CUDA device: running fp32 on {dev}")
            precision = "fp32"
        engine: EngineBase = TorchEngine(
            model, precision=precision, cuda_graphs=cuda_graphs, device=dev, **graph_kwargs
        )
    elif choice == "tensorrt":
        if precision != "fp32":
            notes.append(f"precision {precision} ignored: a TensorRT plan's precision is fixed when it is built")
        kwargs = {} if device is None else {"device": device}
        engine = TensorRTEngine.from_inference_model(model, cuda_graphs=cuda_graphs, **graph_kwargs, **kwargs)
    elif choice == "onnx":
        if precision != "fp32":
            notes.append(f"precision {precision} ignored: the ONNX graph's precision is fixed")
        kwargs = {} if device is None else {"device": device}
        engine = OnnxEngine.from_inference_model(model, cuda_graphs=cuda_graphs, output_mode=output_mode, **kwargs)
    else:
        if precision != "fp32":
            notes.append(f"precision {precision} ignored by the model's own forward")
        engine = ReferenceEngine(model, device=device, cuda_graphs=cuda_graphs, output_mode=output_mode)
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

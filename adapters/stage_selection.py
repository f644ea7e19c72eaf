"""Turns the options into concrete stages, with an explicit reason wherever a fast stage is not used.

`auto` never fails: it takes the fast stage when the machine and the model package allow it and the
reference stage otherwise. An explicit fast choice that cannot run falls back the same way, and the
reason is reported (the block logs it once per step).
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from inference_fastpath.adapters.model_loading import LoadedModel
from inference_fastpath.adapters.options import FastpathOptions
from inference_fastpath.adapters.stages.contracts import PostprocessRequest
from inference_fastpath.adapters.stages.engine_reference import ReferenceEngine
from inference_fastpath.adapters.stages.postprocess_reference import ReferencePostprocess
from inference_fastpath.adapters.stages.preprocess_reference import ReferencePreprocess

LOGGER = logging.getLogger("inference_fastpath")


@dataclass(frozen=True)
class StageChoice:
    stage: str  # "preprocess" | "engine" | "postprocess" | "pipeline_depth"
    requested: str
    selected: str
    fallback_reason: Optional[str] = None
    note: Optional[str] = None  # a selected fast stage's stated difference from the reference, if any


def _import_attribute(module: str, attribute: str) -> Tuple[Optional[Any], Optional[str]]:
    try:
        return getattr(importlib.import_module(module), attribute), None
    except Exception as error:  # ImportError, triton missing, a half-installed extra...
        return None, f"{module}.{attribute} is unavailable ({type(error).__name__}: {error})"


def triton_runnable(device: torch.device, requested: str) -> Optional[str]:
    """None when Triton kernels should run for `device`, else the reason they will not.

    `auto` takes Triton on CUDA only; an explicit request may also run under the CPU interpreter
    (TRITON_INTERPRET=1), which is how CI checks the kernels' numerics.
    """
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and requested != "auto"
    if device.type != "cuda" and not interpreted:
        return "Triton kernels need a CUDA device (explicit choices also run with TRITON_INTERPRET=1)"
    try:
        importlib.import_module("triton")
    except Exception as error:
        return f"triton does not import ({type(error).__name__}: {error})"
    return None


def _model_inference_config(loaded: LoadedModel):
    return getattr(loaded.model, "_inference_config", None)


def _build_triton_stage(
    requested: str, device: torch.device, module: str, class_name: str, make: Callable[[Any], Any]
) -> Tuple[Optional[Any], Optional[str]]:
    """(stage, None) when the Triton stage can run and builds, else (None, reason)."""
    reason = triton_runnable(device, requested)
    if reason is not None:
        return None, reason
    stage_class, reason = _import_attribute(module, class_name)
    if stage_class is None:
        return None, reason
    try:
        return make(stage_class), None
    except Exception as error:
        return None, f"{class_name} could not be built: {type(error).__name__}: {error}"


def select_preprocess(options: FastpathOptions, loaded: LoadedModel) -> Tuple[Callable, StageChoice]:
    reference = ReferencePreprocess(loaded.model)
    if options.preprocess == "reference":
        return reference, StageChoice("preprocess", "reference", "reference")
    def make(stage_class):
        config = _model_inference_config(loaded)
        if config is None:
            raise ValueError(f"the {loaded.backend} model exposes no inference config to plan the resize from")
        return stage_class(
            network_input=config.network_input,
            image_pre_processing=config.image_pre_processing,
            device=loaded.device,
            dtype=_engine_input_dtype(options),
            cuda_graphs=options.cuda_graphs,
        )

    stage, reason = _build_triton_stage(
        options.preprocess, loaded.device, "inference_fastpath.adapters.stages.preprocess_triton", "TritonPreprocess", make
    )
    if stage is None:
        return reference, StageChoice("preprocess", options.preprocess, "reference", reason)
    return _with_frame_fallback(stage, reference), StageChoice("preprocess", options.preprocess, "triton")


def _engine_input_dtype(options: FastpathOptions) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[options.precision]


def select_engine(options: FastpathOptions, loaded: LoadedModel) -> Tuple[Callable, StageChoice]:
    select, reason = _import_attribute("inference_fastpath.adapters.engines.selection", "select_engine")
    if select is not None:
        try:
            engine, reason = select(
                requested=options.engine,
                cuda_graphs=options.cuda_graphs,
                model=loaded.model,
                precision=options.precision,
            )
            if engine is not None:
                return engine, StageChoice("engine", options.engine, engine.name, reason)
        except Exception as error:
            reason = f"engine selection failed: {type(error).__name__}: {error}"
    return ReferenceEngine(loaded.model), StageChoice("engine", options.engine, "reference", reason)


def select_postprocess(options: FastpathOptions, loaded: LoadedModel) -> Tuple[Callable, StageChoice]:
    num_classes = len(loaded.class_names)
    re_mapping = getattr(loaded.model, "_classes_re_mapping", None)
    reference = ReferencePostprocess(num_classes=num_classes, classes_re_mapping=re_mapping)
    if options.postprocess == "reference":
        return reference, StageChoice("postprocess", "reference", "reference")
    stage, reason = _build_triton_stage(
        options.postprocess, loaded.device, "inference_fastpath.adapters.stages.postprocess_fused", "FusedPostprocess",
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
    return _with_request_fallback(stage, reference), StageChoice(
        "postprocess", options.postprocess, "fused", note=stage.precision_note
    )


class _FallbackOnce:
    """Logs each distinct per-call fallback reason once for the stage it guards."""

    def __init__(self, stage_name: str) -> None:
        self._stage_name = stage_name
        self._seen: set = set()

    def note(self, reason: str) -> None:
        if reason not in self._seen:
            self._seen.add(reason)
            LOGGER.warning("%s: falling back to the reference stage for this input: %s", self._stage_name, reason)


def _with_frame_fallback(fast, reference):
    """A preprocess that asks the fast stage per call whether it handles these frames."""
    log = _FallbackOnce(f"preprocess={fast.name}")

    def run(frames):
        reason = fast.unsupported_reason(frames)
        if reason is not None:
            log.note(reason)
            return reference(frames)
        return fast.run_supported(frames)

    run.name = fast.name
    run.fast_stage = fast
    return run


def _with_request_fallback(fast, reference):
    log = _FallbackOnce(f"postprocess={fast.name}")

    def run(raw, metadata, request):
        reason, geometries = fast.check(metadata, request, raw)
        if reason is not None:
            log.note(reason)
            return reference(raw, metadata, request)
        return fast.run_supported(raw, metadata, request, geometries)

    run.name = fast.name
    run.fast_stage = fast
    return run

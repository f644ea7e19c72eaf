"""Loads RF-DETR instance-segmentation packages through inference-models, once per (model, backend, device).

Models load without the inference model manager, so the block works wherever the Workflows runtime
runs (``ExecutionEngine``, ``InferencePipeline``, the HTTP server) without extra init parameters.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

LOGGER = logging.getLogger("inference_fastpath")

# inference-models class names of the RF-DETR instance-segmentation implementations, by backend.
RFDETR_SEGMENTATION_CLASSES = {
    "RFDetrForInstanceSegmentationTorch": "torch",
    "RFDetrForInstanceSegmentationOnnx": "onnx",
    "RFDetrForInstanceSegmentationTRT": "tensorrt",
}
# Our engine option -> inference-models backend name.
ENGINE_TO_BACKEND = {"torch": "torch", "onnx": "onnx", "tensorrt": "trt"}


class ModelLoadingError(ValueError):
    """The model could not be loaded; the message names the model_id and the reason."""

    status_code = 400


class ModelNotFoundError(ModelLoadingError):
    """`model_id` names a local path with no package there."""

    status_code = 404


@dataclass(frozen=True)
class ModelKey:
    model_id: str
    backend: Optional[str]  # None: let inference-models choose
    device: str


@dataclass
class LoadedModel:
    key: ModelKey
    model: object  # an inference-models RF-DETR instance-segmentation model
    backend: str  # "torch" | "onnx" | "tensorrt"
    class_names: Tuple[str, ...]
    device: torch.device


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def looks_like_local_path(model_id: str) -> bool:
    # Roboflow ids look like "project/3"; anything absolute, relative-dotted or existing is a path.
    return model_id.startswith(("/", "./", "../", "~")) or os.path.isdir(model_id)


class ModelRegistry:
    """Process-wide cache of loaded models. Thread-safe; each key loads at most once."""

    def __init__(self) -> None:
        self._models: Dict[ModelKey, LoadedModel] = {}
        self._key_locks: Dict[ModelKey, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, model_id: str, engine: str, device: str, api_key: Optional[str] = None) -> LoadedModel:
        backend = ENGINE_TO_BACKEND.get(engine)  # "auto" -> None
        key = ModelKey(model_id=model_id, backend=backend, device=device)
        with self._lock:
            if key in self._models:
                return self._models[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            loaded = load_rfdetr_segmentation_model(key, api_key=api_key)
            with self._lock:
                self._models[key] = loaded
            return loaded

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._key_locks.clear()


MODEL_REGISTRY = ModelRegistry()


def load_rfdetr_segmentation_model(key: ModelKey, api_key: Optional[str] = None) -> LoadedModel:
    from inference_models import AutoModel

    model_id = key.model_id
    if not isinstance(model_id, str) or not model_id.strip():
        raise ModelLoadingError(f"`model_id` must be a non-empty string, got {model_id!r}.")
    if looks_like_local_path(model_id):
        path = Path(model_id).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(
                f"`model_id` {model_id!r} looks like a local path but no model package directory exists there."
            )
        if not (path / "model_config.json").is_file():
            raise ModelLoadingError(
                f"`model_id` {model_id!r}: directory has no model_config.json, so it is not an "
                "inference-models package."
            )
        model_id = str(path.resolve())
    LOGGER.info("Loading %s (backend=%s, device=%s)", model_id, key.backend or "auto", key.device)
    try:
        model = AutoModel.from_pretrained(
            model_id_or_path=model_id,
            api_key=api_key,
            backend=key.backend,
            device=torch.device(key.device),
            allow_direct_local_storage_loading=True,
        )
    except Exception as error:  # inference-models raises many types; keep the cause attached
        raise ModelLoadingError(
            f"Could not load `model_id` {key.model_id!r} (backend={key.backend or 'auto'}, "
            f"device={key.device}): {type(error).__name__}: {error}"
        ) from error
    backend = RFDETR_SEGMENTATION_CLASSES.get(type(model).__name__)
    if backend is None:
        raise ModelLoadingError(
            f"`model_id` {key.model_id!r} loaded as {type(model).__name__}, which is not an RF-DETR "
            "instance-segmentation model; this block runs RF-DETR instance segmentation only."
        )
    return LoadedModel(
        key=key,
        model=model,
        backend=backend,
        class_names=tuple(model.class_names),
        device=torch.device(key.device),
    )

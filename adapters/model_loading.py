"""Loads RF-DETR instance-segmentation packages through inference-models, once per (model, backend, device).

Models load without the inference model manager, so the block works wherever the Workflows runtime
runs (``ExecutionEngine``, ``InferencePipeline``, the HTTP server). Which models a request may load,
from where and under which key follows the stock block's rules (``model_access.py``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from inference_fastpath.adapters.model_access import (
    AccessSettings,
    check_key_has_access,
    key_for_weights,
    resolve_roboflow_model,
)

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


class ModelRegistry:
    """Process-wide cache of loaded models. Thread-safe; each key loads at most once.

    A loaded model is shared by every request, as the stock model manager shares it; with access
    checks on (``MODELS_CACHE_AUTH_ENABLED``) each request's key is checked before it is served.
    """

    def __init__(self, settings: Optional[AccessSettings] = None) -> None:
        self._models: Dict[ModelKey, LoadedModel] = {}
        self._key_locks: Dict[ModelKey, threading.Lock] = {}
        self._lock = threading.Lock()
        self._settings = settings  # None: this server's settings, read on first use

    @property
    def settings(self) -> AccessSettings:
        if self._settings is None:
            self._settings = AccessSettings.of_this_server()
        return self._settings

    def get(self, model_id: str, engine: str, device: str, api_key: Optional[str] = None) -> LoadedModel:
        """The model for this request, loaded on first use; ``api_key`` is the request's key."""
        if not isinstance(model_id, str) or not model_id.strip():
            raise ModelLoadingError(f"`model_id` must be a non-empty string, got {model_id!r}.")
        settings = self.settings
        settings.refuse_unsafe_model_id(model_id)
        local = settings.is_local_package(model_id)
        if settings.check_keys and not local:
            check_key_has_access(model_id, api_key)
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
            if not local:
                resolve_roboflow_model(model_id, api_key)
            loaded = load_rfdetr_segmentation_model(key, api_key=api_key, settings=settings, local=local)
            with self._lock:
                self._models[key] = loaded
            return loaded

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._key_locks.clear()


MODEL_REGISTRY = ModelRegistry()


def load_rfdetr_segmentation_model(
    key: ModelKey, api_key: Optional[str], settings: AccessSettings, local: bool
) -> LoadedModel:
    """Load ``key`` through inference-models; ``local``: a package directory the operator allows."""
    from inference_models import AutoModel
    from inference_models.errors import ModelRetrievalError

    model_id = key.model_id
    if local:
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
            api_key=key_for_weights(api_key),
            backend=key.backend,
            device=torch.device(key.device),
            allow_untrusted_packages=settings.untrusted_packages,
            allow_direct_local_storage_loading=local,
        )
    except ModelRetrievalError:
        raise  # 401 / 402 / 403 / 404 from the model registry: the server answers with those codes
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

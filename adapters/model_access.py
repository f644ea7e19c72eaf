"""Who may load which model: the stock block's model-access rules, applied to our own loading.

The block loads packages through inference-models itself (not through the inference model manager),
so it applies the same rules the stock `roboflow_instance_segmentation_model@v3` block gets from the
model manager and registry, read from the same server settings:

* **Local package directories** load only when the operator sets
  ``ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES=True``. Otherwise a ``model_id`` with an
  empty, ``.`` or ``..`` path segment is refused by inference's own check, before the file system is
  looked at, so the answer is the same whether the path exists or not.
* **Untrusted packages** follow ``ALLOW_INFERENCE_MODELS_UNTRUSTED_PACKAGES`` (passed to inference-models).
* **API keys**: the request's key (``workflows_core.api_key``: the HTTP request's key, or the pipeline's
  key in ``InferencePipeline``) resolves the model the way the stock registry does, with that key
  alone; the weights are then fetched with the request key or, where the stock adapter falls back to
  it, the environment's key.
* **Access checks**: with ``MODELS_CACHE_AUTH_ENABLED`` (and not ``OFFLINE_MODE``) every request's key
  is checked against every Roboflow model it uses, also when the model is already loaded, through the
  stock registry's own (TTL-cached) check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


class LocalPackagesRefused(ValueError):
    """A local package path while the operator has not allowed local packages."""

    status_code = 403


@dataclass(frozen=True)
class AccessSettings:
    """The server settings that decide model access (read once per process, as inference does).

    Example:
        >>> settings = AccessSettings(local_packages=False, untrusted_packages=False, check_keys=False)
        >>> settings.is_local_package("/models/rfdetr-seg")
        False
        >>> try:
        ...     settings.refuse_unsafe_model_id("/etc")
        ... except LocalPackagesRefused as refusal:
        ...     print(str(refusal).split(" Local")[0])
        Model ID '/etc' contains an unsafe or ambiguous path segment.
    """

    local_packages: bool
    untrusted_packages: bool
    check_keys: bool

    @classmethod
    def of_this_server(cls) -> "AccessSettings":
        from inference.core import env

        return cls(
            local_packages=bool(env.ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES),
            untrusted_packages=bool(env.ALLOW_INFERENCE_MODELS_UNTRUSTED_PACKAGES),
            check_keys=bool(env.MODELS_CACHE_AUTH_ENABLED) and not bool(env.OFFLINE_MODE),
        )

    def is_local_package(self, model_id: str) -> bool:
        """Whether ``model_id`` is loaded from the local disk (only ever when the operator allows it)."""
        return self.local_packages and looks_like_local_path(model_id)

    def refuse_unsafe_model_id(self, model_id: str) -> None:
        """Raise unless ``model_id`` is a Roboflow id, or a local path the operator allows."""
        if self.local_packages:
            return
        from inference.core.cache.model_artifacts import validate_model_id_for_cache

        try:
            validate_model_id_for_cache(model_id=model_id)
        except ValueError as error:
            raise LocalPackagesRefused(
                f"{error} Local model packages are refused unless the server operator sets "
                "ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES=True."
            ) from None


def looks_like_local_path(model_id: str) -> bool:
    # Roboflow ids look like "project/3"; anything absolute, relative-dotted or existing is a path.
    return model_id.startswith(("/", "./", "../", "~")) or os.path.isdir(model_id)


def check_key_has_access(model_id: str, api_key: Optional[str]) -> None:
    """The stock registry's access check for one request (cached per key by inference)."""
    from inference.core.exceptions import RoboflowAPINotAuthorizedError
    from inference.core.registries.roboflow import _check_if_api_key_has_access_to_model

    if not _check_if_api_key_has_access_to_model(api_key=api_key, model_id=model_id):
        raise RoboflowAPINotAuthorizedError(f"The request's API key does not have access to model {model_id}.")


def resolve_roboflow_model(model_id: str, api_key: Optional[str]) -> None:
    """Resolve ``model_id`` with the request's key as the stock registry does before loading (it
    raises the stock errors: 401 for a key that may not use the model, 404 for an unknown one)."""
    from inference.core.registries.roboflow import get_model_type

    get_model_type(model_id=model_id, api_key=api_key)


def key_for_weights(api_key: Optional[str]) -> Optional[str]:
    """The key the stock adapter downloads weights with: the request's, else the environment's."""
    if api_key:
        return api_key
    from inference.core.env import API_KEY

    return API_KEY

"""Model access in-process: local paths, keys and access checks decided as the stock block decides them.

The HTTP-level checks (real server, fake Roboflow API) are in ``test_model_access_http.py``.
"""

from __future__ import annotations

import pytest
import torch

from inference_fastpath.adapters import model_access, model_loading
from inference_fastpath.adapters.model_access import AccessSettings, LocalPackagesRefused
from inference_fastpath.adapters.model_loading import LoadedModel, ModelKey, ModelRegistry

CLOSED = AccessSettings(local_packages=False, untrusted_packages=False, check_keys=False)
CHECKED = AccessSettings(local_packages=False, untrusted_packages=False, check_keys=True)


@pytest.mark.parametrize("model_id", ["/etc", "/nonexistent-dir", "./pkg", "../x", "a//b", "proj/./1"])
def test_paths_are_refused_with_one_answer_whether_they_exist_or_not(model_id):
    from inference.core.cache.model_artifacts import validate_model_id_for_cache

    with pytest.raises(ValueError):  # the stock rule refuses it too
        validate_model_id_for_cache(model_id=model_id)
    with pytest.raises(LocalPackagesRefused) as refusal:
        ModelRegistry(CLOSED).get(model_id, "auto", "cpu")
    message = str(refusal.value)
    assert message == (
        f"Model ID {model_id!r} contains an unsafe or ambiguous path segment. Local model packages are refused "
        "unless the server operator sets ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES=True."
    )


def test_an_existing_package_directory_is_refused_like_a_missing_one(demo_model_dir):
    with pytest.raises(LocalPackagesRefused) as existing:
        ModelRegistry(CLOSED).get(demo_model_dir, "auto", "cpu")
    with pytest.raises(LocalPackagesRefused) as missing:
        ModelRegistry(CLOSED).get(demo_model_dir + "-missing", "auto", "cpu")
    assert str(existing.value).replace(demo_model_dir, "X") == str(missing.value).replace(demo_model_dir + "-missing", "X")


def test_settings_follow_the_server_variables(monkeypatch):
    from inference.core import env

    monkeypatch.setattr(env, "ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES", False)
    monkeypatch.setattr(env, "ALLOW_INFERENCE_MODELS_UNTRUSTED_PACKAGES", True)
    monkeypatch.setattr(env, "MODELS_CACHE_AUTH_ENABLED", True)
    monkeypatch.setattr(env, "OFFLINE_MODE", False)
    assert AccessSettings.of_this_server() == AccessSettings(False, True, True)
    monkeypatch.setattr(env, "OFFLINE_MODE", True)  # stock skips the checks offline
    assert AccessSettings.of_this_server().check_keys is False


def _registry_with_loaded(settings, model_id="proj/1"):
    registry = ModelRegistry(settings)
    key = ModelKey(model_id=model_id, backend=None, device="cpu")
    registry._models[key] = LoadedModel(key=key, model=object(), backend="torch", class_names=("a",),
                                        device=torch.device("cpu"))
    return registry, registry._models[key]


def test_a_loaded_model_is_never_served_to_a_key_that_may_not_use_it(monkeypatch):
    from inference.core.exceptions import RoboflowAPINotAuthorizedError
    from inference.core.registries import roboflow

    asked = []

    def access(api_key, model_id, **_):
        asked.append((api_key, model_id))
        return api_key == "A"

    monkeypatch.setattr(roboflow, "_check_if_api_key_has_access_to_model", access)
    registry, loaded = _registry_with_loaded(CHECKED)
    assert registry.get("proj/1", "auto", "cpu", api_key="A") is loaded
    with pytest.raises(RoboflowAPINotAuthorizedError):
        registry.get("proj/1", "auto", "cpu", api_key="B")
    with pytest.raises(RoboflowAPINotAuthorizedError):
        registry.get("proj/1", "auto", "cpu", api_key=None)
    assert asked == [("A", "proj/1"), ("B", "proj/1"), (None, "proj/1")]  # every request, cached model or not


def test_without_access_checks_a_loaded_model_is_shared_as_stock_shares_it(monkeypatch):
    from inference.core.registries import roboflow

    monkeypatch.setattr(roboflow, "_check_if_api_key_has_access_to_model", lambda **_: pytest.fail("checked"))
    registry, loaded = _registry_with_loaded(CLOSED)
    assert registry.get("proj/1", "auto", "cpu", api_key="B") is loaded


def test_the_request_key_resolves_the_model_and_fetches_weights(monkeypatch):
    resolved, fetched = [], []
    monkeypatch.setattr(model_loading, "resolve_roboflow_model", lambda model_id, api_key: resolved.append(api_key))

    class Stop(Exception):
        pass

    def from_pretrained(**kwargs):
        fetched.append(kwargs)
        raise Stop()

    import inference_models

    monkeypatch.setattr(inference_models.AutoModel, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr("inference.core.env.API_KEY", "ENVKEY")
    for request_key in ("REQ", None):
        with pytest.raises(model_loading.ModelLoadingError):
            ModelRegistry(CLOSED).get("proj/1", "auto", "cpu", api_key=request_key)
    assert resolved == ["REQ", None]  # resolution uses the request's key alone, as the stock registry
    # weights: the request's key, else the environment's (the stock adapter's fallback)
    assert [f["api_key"] for f in fetched] == ["REQ", "ENVKEY"]
    assert all(f["allow_direct_local_storage_loading"] is False and f["allow_untrusted_packages"] is False
               for f in fetched)


def test_key_for_weights_prefers_the_request_key(monkeypatch):
    monkeypatch.setattr("inference.core.env.API_KEY", "ENVKEY")
    assert model_access.key_for_weights("REQ") == "REQ"
    assert model_access.key_for_weights(None) == "ENVKEY"

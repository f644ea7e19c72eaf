"""Model access through the real HTTP server on 127.0.0.1, beside the stock block.

Servers run with the defaults an operator gets (no local packages), pointed at a fake Roboflow API
(``support/fake_roboflow_api.py``) that serves the demo package as ``fastpath-demo/N`` and records the
key of every request. Each scenario uses its own model id: inference caches model metadata per id.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from inference_fastpath.workflows.running import RUNTIME_ENVIRONMENT
from inference_fastpath.workflows import FASTPATH, STOCK_V3, load_workflow

from support.fake_roboflow_api import FakeRoboflowAPI, ServedModel
from support.http_server import image_input, run_workflow, running_server

pytestmark = pytest.mark.slow
OURS = load_workflow(FASTPATH, preprocess="reference", postprocess="reference")
STOCK = load_workflow(STOCK_V3)
WEIGHTS = "/models/v1/external/weights"
STAT = "/models/v1/external/stat"
IMAGE = image_input(np.full((48, 64, 3), 127, np.uint8))


@pytest.fixture(scope="module")
def fake_api(demo_model_dir):
    models = {f"fastpath-demo/{n}": ServedModel(demo_model_dir, {"KEY_A"}) for n in range(1, 7)}
    models["fastpath-demo/9"] = ServedModel(demo_model_dir, {"ENVKEY"})
    with FakeRoboflowAPI(models) as api:
        yield api


def _environment(fake_api, cache, **extra):
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("ROBOFLOW_API_KEY", "API_KEY", "ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES")}
    environment.update(RUNTIME_ENVIRONMENT)
    environment.update(API_BASE_URL=fake_api.url, ROBOFLOW_API_HOST=fake_api.url, MODEL_CACHE_DIR=str(cache),
                       INFERENCE_HOME=str(cache), ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES="False",
                       **extra)
    return environment


@pytest.fixture(scope="module")
def default_server(fake_api, tmp_path_factory):
    """Defaults (local packages refused, no access checks), with a key in the server's environment."""
    root = tmp_path_factory.mktemp("default-server")
    with running_server(_environment(fake_api, root / "cache", API_KEY="ENVKEY"), root / "log") as base:
        yield base


@pytest.fixture(scope="module")
def checking_server(fake_api, tmp_path_factory):
    root = tmp_path_factory.mktemp("checking-server")
    with running_server(_environment(fake_api, root / "cache", MODELS_CACHE_AUTH_ENABLED="True"), root / "log") as base:
        yield base


def _keys_sent(fake_api, path, model_id, since):
    return [r["authorization"] for r in fake_api.requests[since:] if r["path"] == path
            and r["query"].get("modelId") == model_id]


def test_local_paths_are_refused_where_stock_refuses_them(default_server, demo_model_dir):
    answers = {}
    for model_id in ("/etc", "/nonexistent-dir", demo_model_dir, "./relative-pkg"):
        ours = run_workflow(default_server, OURS, {"image": IMAGE, "model_id": model_id})
        stock = run_workflow(default_server, STOCK, {"image": IMAGE, "model_id": model_id})
        assert ours.status_code != 200 and stock.status_code != 200
        assert "unsafe or ambiguous path segment" in stock.text
        message = ours.json()["message"]
        assert "unsafe or ambiguous path segment" in message
        assert "ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES=True" in message
        answers[model_id] = (ours.status_code, message.replace(repr(model_id), "<id>"))
    # the same answer whether the path exists, is a package, or is missing: no file-system oracle
    assert len(set(answers.values())) == 1, answers
    assert all(word not in str(answers) for word in ("model_config", "exists", "directory"))


def test_the_request_key_reaches_the_model_loader(default_server, fake_api):
    since = len(fake_api.requests)
    ours = run_workflow(default_server, OURS, {"image": IMAGE, "model_id": "fastpath-demo/1"}, api_key="KEY_A")
    assert ours.status_code == 200, ours.text[:500]
    assert _keys_sent(fake_api, WEIGHTS, "fastpath-demo/1", since) == ["Bearer KEY_A"]
    assert set(_keys_sent(fake_api, STAT, "fastpath-demo/1", since)) == {"Bearer KEY_A"}
    stock = run_workflow(default_server, STOCK, {"image": IMAGE, "model_id": "fastpath-demo/2"}, api_key="KEY_A")
    assert stock.status_code == 200, stock.text[:500]
    assert len(ours.json()["outputs"][0]["predictions"]["predictions"]) == len(
        stock.json()["outputs"][0]["predictions"]["predictions"])


def test_a_request_without_a_key_never_gets_the_environment_key(default_server, fake_api):
    """Stock resolves the model with the request's key alone: no key, a 401 from the API."""
    since = len(fake_api.requests)
    ours = run_workflow(default_server, OURS, {"image": IMAGE, "model_id": "fastpath-demo/9"})
    ours_keys = [r["authorization"] for r in fake_api.requests[since:]]
    since = len(fake_api.requests)
    stock = run_workflow(default_server, STOCK, {"image": IMAGE, "model_id": "fastpath-demo/9"})
    stock_keys = [r["authorization"] for r in fake_api.requests[since:]]
    assert ours.status_code == stock.status_code == 401, (ours.text[:300], stock.text[:300])
    assert "Bearer ENVKEY" not in ours_keys and "Bearer ENVKEY" not in stock_keys
    assert ours_keys == stock_keys == [None]  # one keyless model lookup each, refused


def test_with_access_checks_a_loaded_model_is_refused_to_another_key(checking_server, fake_api):
    for workflow, model_id in ((OURS, "fastpath-demo/3"), (STOCK, "fastpath-demo/4")):
        first = run_workflow(checking_server, workflow, {"image": IMAGE, "model_id": model_id}, api_key="KEY_A")
        assert first.status_code == 200, first.text[:500]
        other = run_workflow(checking_server, workflow, {"image": IMAGE, "model_id": model_id}, api_key="KEY_B")
        assert other.status_code == 401, other.text[:500]
        keyless = run_workflow(checking_server, workflow, {"image": IMAGE, "model_id": model_id})
        assert keyless.status_code == 401, keyless.text[:500]
        again = run_workflow(checking_server, workflow, {"image": IMAGE, "model_id": model_id}, api_key="KEY_A")
        assert again.status_code == 200

"""The inference HTTP server's FastAPI app with our plugin loaded, for machines without Docker.

    pip install "inference-cpu[http]==1.8.3" -e .        # inference-gpu[http] on CUDA machines
    uvicorn inference_fastpath.examples.serve:build_app --factory --host 127.0.0.1 --port 9001

The workflow builder (or any client) then finds our block at ``POST /workflows/blocks/describe`` and
runs workflows with it at ``POST /workflows/run``. With Docker, see ``examples/Dockerfile.server``.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from inference_fastpath.workflows.running import configure_environment


@contextmanager
def _landing_page_directories():
    """The server mounts its landing page from paths relative to the working directory (the Docker
    image's layout); give it empty ones so the API starts anywhere."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fastpath-server-") as directory:
        for relative in ("inference/landing/out/static", "inference/landing/out/_next/static"):
            Path(directory, relative).mkdir(parents=True, exist_ok=True)
        os.chdir(directory)
        try:
            yield
        finally:
            os.chdir(previous)


def build_app():
    # A server answers other people's requests: local packages stay refused unless the operator sets
    # ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES=True in the server's environment.
    configure_environment(allow_local_packages=False)
    from inference.core.interfaces.http.http_api import HttpInterface
    from inference.core.managers.base import ModelManager
    from inference.core.registries.roboflow import RoboflowModelRegistry
    from inference.models.utils import ROBOFLOW_MODEL_TYPES

    model_manager = ModelManager(model_registry=RoboflowModelRegistry(ROBOFLOW_MODEL_TYPES))
    with _landing_page_directories():
        return HttpInterface(model_manager).app

"""The real inference HTTP server with our plugin, started under uvicorn on 127.0.0.1 for a test."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

import cv2
import httpx
import numpy as np
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(environment: Dict[str, str], log: Path, startup_s: float = 240) -> Iterator[str]:
    """Start ``examples/serve.py``'s app with exactly ``environment``; yields the base URL."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "inference_fastpath.examples.serve:build_app", "--factory",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, env=environment, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited early:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not start in time:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def run_workflow(server: str, workflow: dict, inputs: dict, **request) -> httpx.Response:
    return httpx.post(f"{server}/workflows/run", json={"specification": workflow, "inputs": inputs, **request},
                      timeout=300)


def image_input(frame: np.ndarray) -> dict:
    return {"type": "base64", "value": base64.b64encode(cv2.imencode(".png", frame)[1].tobytes()).decode()}

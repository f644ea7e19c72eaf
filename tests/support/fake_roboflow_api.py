"""A stand-in Roboflow API serving local model packages to ``inference`` and ``inference_models``.

GET /models/v1/external/stat?modelId=M (inference's model registry: task type, architecture),
GET /models/v1/external/weights?modelId=M (inference_models' weights provider: package list), and
GET|HEAD /files/<package_id>/<file> (package files; like the real API's signed URLs, never key-checked).
Key: ``Authorization: Bearer <key>`` or an ``api_key`` query parameter. On stat and weights a key outside the
model's allowed set, or none, gets 401; an unknown model id 404. Every request is recorded in ``requests``.
Set API_BASE_URL (inference) and ROBOFLOW_API_HOST (inference_models) to ``api.url`` before importing them.
"""
import hashlib
import json
import os
import shutil
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterable, List, Optional

METADATA_PATHS = ("/models/v1/external/stat", "/models/v1/external/weights")


@dataclass
class ServedModel:
    package_dir: str
    allowed_keys: Iterable[str]
    model_architecture: str = "rfdetr"
    task_type: str = "instance-segmentation"
    model_variant: Optional[str] = None
    backend: str = "torch"
    trusted_source: bool = True  # False: inference_models refuses it unless allow_untrusted_packages=True


class FakeRoboflowAPI:
    def __init__(self, models: Dict[str, ServedModel], host: str = "127.0.0.1", port: int = 0):
        self.models = models
        self.requests: List[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._server.api = self
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._files: Dict[str, Dict[str, str]] = {}  # package id -> {file handle: local path}
        self._packages = {model_id: self._package(model_id, spec) for model_id, spec in models.items()}

    def _package(self, model_id: str, spec: ServedModel) -> dict:
        package_id = hashlib.md5(model_id.encode()).hexdigest()[:16]  # must be alphanumeric
        # inference_models writes model_config.json itself and rejects packages that ship one.
        files = {name: os.path.join(spec.package_dir, name) for name in sorted(os.listdir(spec.package_dir))
                 if name != "model_config.json" and os.path.isfile(os.path.join(spec.package_dir, name))}
        self._files[package_id] = files
        return {"type": "external-model-package-v1", "packageId": package_id,
                "trustedSource": spec.trusted_source,
                "packageManifest": {"type": f"{spec.backend}-model-package-v1", "backendType": spec.backend,
                                    "dynamicBatchSize": True, "quantization": "fp32"},
                "packageFiles": [{"fileHandle": name, "md5Hash": _md5(path),
                                  "downloadUrl": f"{self.url}/files/{package_id}/{name}"}
                                 for name, path in files.items()]}

    def requests_to(self, path: str) -> List[dict]:
        with self._lock:
            return [r for r in self.requests if r["path"] == path]

    def start(self) -> "FakeRoboflowAPI":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self, *_) -> None:
        self._server.shutdown()
        self._server.server_close()

    __enter__, __exit__ = start, stop


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        api: FakeRoboflowAPI = self.server.api
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        auth = self.headers.get("Authorization")
        with api._lock:
            api.requests.append({"method": self.command, "path": url.path, "query": query, "authorization": auth})
        if url.path.startswith("/files/"):
            return self._file(api, url.path)
        spec = api.models.get(query.get("modelId", ""))
        if url.path not in METADATA_PATHS or spec is None:
            return self._json(404, {"error": "Not found"})
        key = auth[len("Bearer "):] if (auth or "").startswith("Bearer ") else query.get("api_key")
        if key not in set(spec.allowed_keys):
            return self._json(401, {"error": "Unauthorized"})
        metadata = {"type": "external-model-metadata-v1", "modelId": query["modelId"],
                    "modelArchitecture": spec.model_architecture, "taskType": spec.task_type,
                    "modelVariant": spec.model_variant}
        if url.path == METADATA_PATHS[1]:
            metadata["modelPackages"] = [api._packages[query["modelId"]]]
        self._json(200, {"modelMetadata": metadata})

    def _file(self, api: FakeRoboflowAPI, path: str) -> None:
        _, _, package_id, name = (path.split("/", 3) + ["", ""])[:4]
        local = api._files.get(package_id, {}).get(urllib.parse.unquote(name))
        if local is None:
            return self._json(404, {"error": "Not found"})
        self.send_response(200)  # no Accept-Ranges header: the client streams one plain GET, no Range requests
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(os.path.getsize(local)))
        self.end_headers()
        if self.command == "GET":
            with open(local, "rb") as f:
                shutil.copyfileobj(f, self.wfile, 1 << 20)


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

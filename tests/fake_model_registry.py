"""A stand-in for the Kubeflow Model Registry's REST API (api/model_registry/v1), serving exactly the endpoints
that the `model-registry` client calls to register a version, and recording what was registered."""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

BASE = "/api/model_registry/v1"


class FakeModelRegistry:
    def __init__(self, token: str | None = None):
        self.token = token  # when set, every request must carry "Authorization: Bearer <token>"
        self.models: dict[str, dict] = {}  # by id
        self.versions: dict[str, dict] = {}
        self.artifacts: dict[str, dict] = {}  # by id, each with its version's id under "_version"
        self.calls: list[tuple[str, str]] = []  # (method, path) of every request
        self.unexpected: list[str] = []
        self.down = False  # answer every request with 503
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> "FakeModelRegistry":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- what a test asserts on
    def version(self, model: str, version: str) -> dict | None:
        rm = self._find(self.models, name=model)
        return rm and self._find(self.versions, name=version, registeredModelId=rm["id"])

    def artifacts_of(self, version_id: str) -> list[dict]:
        return [a for a in self.artifacts.values() if a["_version"] == version_id]

    # -- the API
    def _new(self, table: dict, body: dict) -> dict:
        with self._lock:
            rid = str(next(self._ids))
            obj = {**body, "id": rid, "createTimeSinceEpoch": "1", "lastUpdateTimeSinceEpoch": "1"}
            table[rid] = obj
        return obj

    @staticmethod
    def _find(table: dict, **match) -> dict | None:
        return next((o for o in table.values() if all(o.get(k) == v for k, v in match.items())), None)

    def _answer(self, method: str, path: str, query: dict, body: dict) -> tuple[int, object]:
        if method == "GET" and path == f"{BASE}/registered_models":
            items = list(self.models.values())
            return 200, {"items": items, "nextPageToken": "", "pageSize": int(query.get("pageSize", 100)),
                         "size": len(items)}
        if method == "GET" and path == f"{BASE}/registered_model":
            found = self._find(self.models, name=query.get("name"))
            return (200, found) if found else (404, {"code": "404", "message": "no such registered model"})
        if method == "POST" and path == f"{BASE}/registered_models":
            return 201, self._new(self.models, body)
        if method == "GET" and path == f"{BASE}/model_version":
            found = self._find(self.versions, name=query.get("name"), registeredModelId=query.get("parentResourceId"))
            return (200, found) if found else (404, {"code": "404", "message": "no such model version"})
        if method == "POST" and path == f"{BASE}/model_versions":
            if body.get("registeredModelId") not in self.models:
                return 400, {"code": "400", "message": "unknown registeredModelId"}
            return 201, self._new(self.versions, body)
        if method == "POST" and path.startswith(f"{BASE}/model_versions/") and path.endswith("/artifacts"):
            version_id = path[len(f"{BASE}/model_versions/"):-len("/artifacts")]
            if version_id not in self.versions:
                return 404, {"code": "404", "message": "no such model version"}
            art = self._new(self.artifacts, {**body, "_version": version_id})
            return 200, {k: v for k, v in art.items() if k != "_version"}
        if method == "GET" and path == f"{BASE}/model_artifact":
            for art in self.artifacts_of(query.get("parentResourceId", "")):
                if art.get("name") == query.get("name"):
                    return 200, {k: v for k, v in art.items() if k != "_version"}
            return 404, {"code": "404", "message": "no such model artifact"}
        self.unexpected.append(f"{method} {path}")
        return 501, {"code": "501", "message": f"the fake does not serve {method} {path}"}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                url = urlparse(self.path)
                fake.calls.append((method, url.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                if fake.down:
                    status, answer = 503, {"code": "503", "message": "registry unavailable"}
                elif fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    status, answer = 401, {"code": "401", "message": "unauthorized"}
                else:
                    query = {k: v[0] for k, v in parse_qs(url.query).items()}
                    status, answer = fake._answer(method, url.path, query, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 - http.server's names
                self._serve("GET")

            def do_POST(self):  # noqa: N802
                self._serve("POST")

            def do_PATCH(self):  # noqa: N802
                self._serve("PATCH")

            def log_message(self, *args):
                pass

        return Handler

"""A `vllm serve` engine seen through its HTTP endpoints, with the methods `connect` calls on a `vllm.LLM`.

The OpenAI server exposes vLLM's RL weight-update protocol and `collective_rpc` only in dev mode
(VLLM_SERVER_DEV_MODE=1; 0.32 `entrypoints/rl/online`, 0.25 `entrypoints/serve/dev/rlhf`, same paths and bodies):
POST /init_weight_transfer_engine {"init_info"}, /start_weight_update, /update_weights {"update_info"},
/finish_weight_update, /pause?mode=wait, /resume, /collective_rpc {"method", "args": [str]}. Start the server with
`--weight-transfer-config '{"backend": "mxfp4_rl"}' --worker-extension-cls
mxfp4_serve.sync.worker.MXFP4SyncExtension` and keep the port private: these endpoints change the served weights.
Plain urllib: no client dependency.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator


class EngineHTTPError(RuntimeError):
    """The server refused a weight-update call (its message included) or is not in dev mode."""


class HTTPEngine:
    """`url`: the server's base URL (e.g. http://127.0.0.1:8000); `api_key`: its --api-key, if any."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _post(self, path: str, body: dict | None = None):
        data = json.dumps(body if body is not None else {}).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            hint = " (is the server running with VLLM_SERVER_DEV_MODE=1?)" if exc.code == 404 else ""
            raise EngineHTTPError(f"POST {self.url}{path} failed with HTTP {exc.code}{hint}: {detail}") from None
        return json.loads(raw) if raw else None

    # ---- what EngineHandle / TransferSync call ----
    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        out = self._post("/collective_rpc", {"method": method, "args": [str(a) for a in args]}) or {}
        return list(out.get("results", []))

    def init_weight_transfer_engine(self, request: dict) -> None:
        self._post("/init_weight_transfer_engine", {"init_info": request["init_info"]})

    def start_weight_update(self) -> None:
        self._post("/start_weight_update")

    def update_weights(self, request: dict) -> None:
        self._post("/update_weights", {"update_info": request["update_info"]})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._post("/finish_weight_update", {} if weight_version is None else {"weight_version": weight_version})

    def shutdown_weight_transfer_engine(self) -> None:
        with contextlib.suppress(EngineHTTPError):  # vLLM 0.25 has no such endpoint: the group ends with the learner
            self._post("/shutdown_weight_transfer_engine")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """New requests wait and in-flight ones finish on the old weights (mode=wait); afterwards the prefix cache
        is reset (its KV blocks were computed by the old weights) and generation resumes."""
        self._post("/pause?mode=wait")
        try:
            yield
            self._post("/reset_prefix_cache")
        finally:
            self._post("/resume")

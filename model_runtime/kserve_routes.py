"""The KServe routes: V1 predict, V2 infer (JSON and binary tensors), the health and readiness probes and
vLLM's `GET /health`.

Added before KServe's own, so every route decodes its body through request_decoding (size limit, strict
UTF-8, depth, tensor checks) and answers a bad request with a 4xx in KServe's `{"error": ...}` shape. The
model repository's load/unload routes answer 403 unless enabled (`--enable_model_repository_routes`):
unauthenticated, they take the model away. Also the conversion of KServe's dataplane InferRequest (gRPC)
into the V2 JSON shape, so one decoder serves both.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from kserve.protocol.infer_type import InferRequest
from starlette.responses import JSONResponse, Response

from model_runtime.errors import ServingError, invalid
from model_runtime.http_common import error_response, read_request, record_error, until_disconnect
from model_runtime.protocol import V1Request, V1Response
from model_runtime.request_decoding import (
    V2_HEADER_LENGTH,
    V2Prompts,
    check_decoded,
    decode_v1,
    decode_v2_binary,
    decode_v2_json,
)
from model_runtime.serving import Serving

if TYPE_CHECKING:
    from model_runtime.server import DistilleryModel

log = logging.getLogger("model_runtime.server")  # the HTTP layer logs under one name

T = TypeVar("T")


def new_request_id() -> str:
    return f"gen-{uuid.uuid4().hex}"


def infer_request_dict(request: InferRequest) -> dict[str, Any]:
    """A dataplane InferRequest back into the V2 JSON shape, for the one V2 decoder."""
    inputs = []
    for tensor in request.inputs or []:
        data = list(tensor.data) if tensor.data is not None else []
        try:
            data = [d.decode("utf-8") if isinstance(d, bytes) else d for d in data]
        except UnicodeDecodeError as exc:
            raise invalid("inputs.0: a BYTES element is not valid UTF-8", param="inputs.0") from exc
        inputs.append({"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype, "data": data})
    body = {"id": request.id, "inputs": inputs, "parameters": _plain_parameters(request.parameters)}
    check_decoded(body)
    return body


def _plain_parameters(parameters: Any) -> dict[str, Any]:
    if not parameters:
        return {}
    out = {}
    for key, value in dict(parameters).items():
        if hasattr(value, "WhichOneof"):  # gRPC InferParameter
            value = getattr(value, value.WhichOneof("parameter_choice"))
        out[key] = value
    return out


class KServeRoutes:
    """KServe V1/V2 inference, the probes and `GET /health`, bound to one DistilleryModel."""

    def __init__(self, model: DistilleryModel) -> None:
        self.model = model

    def register(self, app: FastAPI) -> None:
        app.add_api_route("/v1/models/{model_name}:predict", self.v1_predict, methods=["POST"], response_model=None)
        for path in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer"):
            app.add_api_route(path, self.v2_infer, methods=["POST"], response_model=None)
        app.add_api_route("/health", self.health, methods=["GET"], response_model=None)
        app.add_api_route("/v2/health/ready", self.server_ready, methods=["GET"], response_model=None)
        for path in ("/v1/models/{model_name}", "/v2/models/{model_name}/ready"):
            app.add_api_route(path, self.model_ready, methods=["GET"], response_model=None)
        if not self.model.options.enable_model_repository_routes:
            for action in ("load", "unload"):
                app.add_api_route(f"/v2/repository/models/{{model_name}}/{action}", self.repository_disabled,
                                  methods=["POST"], response_model=None)

    async def health(self) -> Response:
        """vLLM's probe path (load tools such as guidellm wait for it): 200 while the server is up."""
        return Response(status_code=200)

    async def server_ready(self) -> Response:
        ready = bool(self.model.ready)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def model_ready(self, model_name: str) -> Response:
        """Readiness follows the model: false whenever it is not loaded (so Kubernetes takes the pod out)."""
        if model_name != self.model.name:
            return JSONResponse({"error": f"Model with name {model_name} does not exist."}, status_code=404)
        if not self.model.ready or self.model.serving is None:
            return JSONResponse({"error": f"Model with name {model_name} is not ready."}, status_code=503)
        return JSONResponse({"name": model_name, "ready": True})

    async def repository_disabled(self, model_name: str) -> Response:
        return JSONResponse({"error": "the model repository's load/unload routes are disabled on this server "
                                      "(start it with --enable_model_repository_routes to allow them)"},
                            status_code=403)

    async def v1_predict(self, model_name: str, request: Request) -> Response:
        model = self.model

        def decode(raw: bytes) -> V1Request:
            return decode_v1(raw, model.max_instances)

        async def run(serving: Serving, req: V1Request) -> dict[str, Any]:
            return V1Response(predictions=await model.v1_texts(serving, req)).model_dump()

        return await self._handle(request, "v1_predict", model_name, decode, run)

    async def v2_infer(self, model_name: str, request: Request, model_version: str | None = None) -> Response:
        model = self.model
        header = request.headers.get(V2_HEADER_LENGTH)

        def decode(raw: bytes) -> V2Prompts:
            if header is not None:
                return decode_v2_binary(raw, header, model.max_instances)
            return decode_v2_json(raw, model.max_instances)

        async def run(serving: Serving, req: V2Prompts) -> dict[str, Any]:
            texts = await model.generate(serving, req.prompts, req.parameters)
            return {"model_name": model.name, "id": req.id or new_request_id(),
                    "outputs": [{"name": "text_output", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}

        return await self._handle(request, "v2_infer", model_name, decode, run)

    async def _handle(self, request: Request, endpoint: str, model_name: str, decode: Callable[[bytes], T],
                      run: Callable[[Serving, T], Awaitable[dict[str, Any]]]) -> Response:
        metrics = self.model.metrics
        started = time.monotonic()
        metrics.request_started()
        status = 499  # unless it ends otherwise: cancelled with its client
        try:
            if model_name != self.model.name:
                raise ServingError(404, f"Model with name {model_name} does not exist.", code="model_not_found")
            serving = self.model._serving()
            req = await read_request(request, self.model, decode)
            body = await until_disconnect(request, run(serving, req))
            status = 200
            return JSONResponse(body)
        except ServingError as exc:
            record_error(metrics, exc)
            status = exc.status
            return error_response(exc, request.url.path)
        except Exception:
            log.exception("unexpected error", extra={"endpoint": endpoint})
            metrics.error("server_error")
            status = 500
            return JSONResponse({"error": "Internal server error."}, status_code=500)
        finally:
            metrics.request_finished(endpoint, status, time.monotonic() - started)

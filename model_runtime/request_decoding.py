"""The one request-decoding layer: bytes on the wire -> checked request data, for every route.

- BodyLimitMiddleware (ASGI, on the whole app): a body over the limit is a 413 on any route,
  answered from the declared Content-Length before a byte is read, or as soon as a chunked body
  passes the limit; the excess is read and dropped, never held.
- decode_json(): strict UTF-8 (invalid bytes refused), no lone surrogates (`"\\ud800"`) anywhere,
  no NaN/Infinity, bounded nesting depth. Large bodies are decoded in the worker pool.
- decode_v1() / decode_v2_json() / decode_v2_binary(): KServe V1 instances and Open Inference
  Protocol tensors (JSON or binary) -> prompts, with datatype, shape and size checks.
Every failure is a ServingError (400/413/422); the route renders it in its protocol's error shape:
OpenAI's error object on the OpenAI routes, KServe's `{"error": "..."}` on V1/V2.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pydantic import BaseModel, ValidationError

from model_runtime.errors import ServingError, invalid
from model_runtime.protocol import GenerationParameters, V1Request, validation_error_param

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 16 * 2**20  # far beyond any context window; bounds the work per request
MAX_JSON_DEPTH = 32  # our deepest schema is 5 levels (messages.0.content.0.text)
OFFLOAD_BYTES = 256 * 2**10  # bodies larger than this are decoded in the worker pool, off the event loop
OPENAI_PREFIXES = ("/openai/v1", "/v1")
_SURROGATE = re.compile("[\ud800-\udfff]")
V2_HEADER_LENGTH = "inference-header-content-length"


# A V2 tensor of prompts is a list (1-D) or a batch of lists; no real client sends more dimensions.
MAX_V2_DIMS = 8


def too_large(limit: int) -> ServingError:
    return ServingError(413, f"request body over the limit of {limit} bytes", code="body_too_large")


def is_openai_path(path: str) -> bool:
    return path.startswith("/openai/") or path in {f"/v1/{p}" for p in ("chat/completions", "completions",
                                                                         "models")}


def error_body(exc: ServingError, path: str) -> dict[str, Any]:
    """The error in the shape of the route's protocol: OpenAI's object, or KServe's {"error": text}."""
    if is_openai_path(path):
        return exc.body()
    where = f"{exc.param}: " if exc.param and not exc.message.startswith(exc.param) else ""
    return {"error": where + exc.message}


class BodyLimitMiddleware:
    """413 for any request body over `limit` bytes, on every route, without holding the excess."""

    def __init__(self, app: ASGIApp, limit: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            # a client waiting for "100 Continue" (curl, for large bodies) then never sends the body
            await self._refuse(scope, receive, send, more=_header(scope, b"expect") != "100-continue")
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send, more=True)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, more: bool = True) -> None:
        # Read the rest and drop it (bounded by the server's body timeout), so the client gets its 413
        # instead of a reset connection mid-upload; nothing is kept.
        while more:
            message = await receive()
            more = message["type"] == "http.request" and bool(message.get("more_body"))
        body = json.dumps(error_body(too_large(self.limit), scope.get("path", ""))).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    """Raised by the middleware's receive when a body without a declared length passes the limit; a handler
    reading the body turns it into its route's 413 (read_request), the middleware answers for the others."""


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == wanted:
            return bytes(value).decode("latin-1").strip().lower()
    return None


# --------------------------------------------------------------------------- JSON
def _refuse_constant(name: str) -> Any:
    raise invalid(f"request body is not valid JSON: {name} is not a JSON number")


def decode_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON: UTF-8 only, no lone surrogates, no NaN/Infinity, at most `max_depth` levels."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"request body is not valid UTF-8 (at byte {exc.start})") from exc
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise invalid(f"request body is nested more than {max_depth} levels deep") from exc
    except ValueError as exc:  # JSONDecodeError, and the int-digits limit
        raise invalid(f"request body is not valid JSON: {exc}") from exc
    check_decoded(data, max_depth)
    return data


def check_decoded(data: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Depth and lone-surrogate check over decoded JSON, iteratively (no recursion to exhaust)."""
    stack: list[tuple[Any, int, tuple[str, ...]]] = [(data, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict):
            items: Any = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            if isinstance(node, str) and _SURROGATE.search(node):
                raise _surrogate(path)
            continue
        if depth > max_depth:
            raise invalid(f"request body is nested more than {max_depth} levels deep")
        for key, value in items:
            if isinstance(key, str) and _SURROGATE.search(key):
                raise _surrogate(path)
            if isinstance(value, str):
                if _SURROGATE.search(value):
                    raise _surrogate((*path, str(key)))
            elif isinstance(value, dict | list):
                stack.append((value, depth + 1, (*path, str(key))))


def _surrogate(path: tuple[str, ...]) -> ServingError:
    param = ".".join(path) or None
    where = f"{param}: " if param else ""
    return invalid(f"{where}text contains a lone UTF-16 surrogate (not valid Unicode)", param=param)


def validate(cls: type[BaseModel], data: Any) -> Any:
    """A pydantic model from decoded JSON; a 400 naming the first offending field otherwise."""
    if not isinstance(data, dict):
        raise invalid("request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        message, param = validation_error_param(exc)
        raise invalid(message, param=param) from exc


# --------------------------------------------------------------------------- KServe V1
def decode_v1(raw: bytes, max_instances: int) -> V1Request:
    """`{"instances": [...], "parameters": {...}}`; more instances than the server can ever hold at once
    (batch + queue) is a 400 naming the limit, not an endless 429."""
    req: V1Request = validate(V1Request, decode_json(raw))
    if len(req.instances) > max_instances:
        raise invalid(f"instances: {len(req.instances)} instances, but this server holds at most {max_instances} "
                      "requests at once (max_batch_size + max_queue); send fewer per request", param="instances")
    return req


# --------------------------------------------------------------------------- KServe V2 (Open Inference Protocol)
class V2Prompts(BaseModel):
    """A decoded V2 request: its id (or None), the prompts of its one BYTES input, its parameters."""

    id: str | None
    input_name: str
    prompts: list[str]
    parameters: GenerationParameters


def decode_v2_json(raw: bytes, max_prompts: int) -> V2Prompts:
    return v2_prompts_from_dict(decode_json(raw), max_prompts)


def decode_v2_binary(raw: bytes, header_length: str, max_prompts: int) -> V2Prompts:
    """Binary tensor extension: a JSON header of `header_length` bytes, then each input's raw bytes
    (`parameters.binary_data_size`), BYTES elements as a 4-byte little-endian length + UTF-8 text."""
    try:
        size = int(header_length)
    except ValueError as exc:
        raise invalid(f"{V2_HEADER_LENGTH} must be an integer") from exc
    if not 0 < size <= len(raw):
        raise invalid(f"{V2_HEADER_LENGTH}={size} does not fit the {len(raw)}-byte body")
    return v2_prompts_from_dict(decode_json(raw[:size]), max_prompts, raw[size:])


def v2_prompts_from_dict(data: Any, max_prompts: int, binary: bytes | None = None) -> V2Prompts:
    if not isinstance(data, dict):
        raise invalid("request body must be a JSON object")
    request_id = data.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise invalid("id must be a string", param="id")
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise invalid("inputs must hold exactly one tensor (a BYTES tensor of prompts)", param="inputs")
    tensor = inputs[0]
    name = tensor.get("name")
    if not isinstance(name, str):
        raise invalid("inputs.0.name must be a string", param="inputs.0.name")
    if tensor.get("datatype") != "BYTES":
        raise invalid(f"inputs.0.datatype must be BYTES (text), got {str(tensor.get('datatype'))[:32]!r}",
                      param="inputs.0.datatype")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not shape or len(shape) > MAX_V2_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise invalid(f"inputs.0.shape must be a list of 1 to {MAX_V2_DIMS} non-negative integers",
                      param="inputs.0.shape")
    if any(d > max_prompts for d in shape):
        # before the product: a product of huge ints is slow (it holds the GIL) and cannot be printed
        raise invalid(f"inputs.0.shape: a dimension is larger than the {max_prompts} requests this server holds "
                      "at once (max_batch_size + max_queue)", param="inputs.0.shape")
    count = math.prod(shape)
    if count > max_prompts:
        raise invalid(f"inputs.0: {count} prompts, but this server holds at most {max_prompts} requests at once "
                      "(max_batch_size + max_queue)", param="inputs.0.shape")
    params = tensor.get("parameters") or {}
    if binary is not None and isinstance(params, dict) and "binary_data_size" in params:
        if "data" in tensor:
            raise invalid("inputs.0 has both data and binary_data_size", param="inputs.0")
        prompts = _binary_bytes(binary, params["binary_data_size"], count)
    else:
        prompts = _json_bytes(tensor.get("data"))
    if len(prompts) != count:
        raise invalid(f"inputs.0: shape {shape} holds {count} elements but data has {len(prompts)}",
                      param="inputs.0.shape")
    if not prompts:
        raise invalid("inputs.0 has no prompts", param="inputs.0.data")
    parameters = validate(GenerationParameters, data.get("parameters") or {})
    return V2Prompts(id=request_id, input_name=name, prompts=prompts, parameters=parameters)


def _json_bytes(data: Any) -> list[str]:
    if not isinstance(data, list):
        raise invalid("inputs.0.data must be a list of strings", param="inputs.0.data")
    return _flatten_strings(data)


def _flatten_strings(data: list[Any]) -> list[str]:
    """Row-major nested lists are allowed by the protocol; flattened iteratively, order kept."""
    out: list[str] = []
    stack: list[Any] = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise invalid("inputs.0.data must hold strings (BYTES)", param="inputs.0.data")
    return out


_END = object()


def _binary_bytes(binary: bytes, declared: Any, count: int) -> list[str]:
    if not isinstance(declared, int) or isinstance(declared, bool) or declared < 0:
        raise invalid("inputs.0.parameters.binary_data_size must be a non-negative integer",
                      param="inputs.0.parameters.binary_data_size")
    if declared > len(binary):
        raise invalid(f"inputs.0: binary_data_size={declared} but the body holds {len(binary)} bytes after "
                      "the JSON header", param="inputs.0.parameters.binary_data_size")
    blob = memoryview(binary)[:declared]
    out: list[str] = []
    pos = 0
    while pos < declared:
        if pos + 4 > declared or len(out) >= count:
            raise invalid("inputs.0: binary BYTES data does not match its shape", param="inputs.0")
        (length,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + length > declared:
            raise invalid("inputs.0: a binary BYTES element runs past binary_data_size", param="inputs.0")
        try:
            out.append(bytes(blob[pos:pos + length]).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise invalid("inputs.0: a BYTES element is not valid UTF-8", param="inputs.0") from exc
        pos += length
    return out

"""request_decoding.py: strict JSON (UTF-8, surrogates, depth, NaN), V1 instance limits and V2 tensor
checks (JSON and binary), the error shape per protocol, and the body-limit middleware."""

from __future__ import annotations

import json
import struct

import pytest

from model_runtime.request_decoding import (
    BodyLimitMiddleware,
    decode_json,
    decode_v1,
    decode_v2_binary,
    decode_v2_json,
    error_body,
)
from model_runtime.serving import ServingError, invalid


def v2(inputs: list, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def refused(fn, *args, status: int = 400) -> ServingError:
    with pytest.raises(ServingError) as err:
        fn(*args)
    assert err.value.status == status
    return err.value


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"[" * 1000 + b"]" * 1000, "nested"),  # json.loads' RecursionError
        (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nested"),  # parses, but deeper than any schema
        (b'{"model": "\\ud800"}', "surrogate"),
        (b'{"messages": [{"content": "a\\udfffb"}]}', "surrogate"),
        (b'{"\\ud800": 1}', "surrogate"),
        ('{"model": "\ud800"}'.encode("utf-8", "surrogatepass"), "UTF-8"),  # a raw (CESU) surrogate
        (b'{"model": "\xff"}', "UTF-8"),
        (b'{"temperature": NaN}', "NaN"),
        (b'{"n": ' + b"9" * 5000 + b"}", "JSON"),
        (b"{not json", "JSON"),
    ],
)
def test_bad_json_is_a_400_naming_the_problem(raw, words):
    err = refused(decode_json, raw)
    assert words in err.message
    assert "Traceback" not in err.message and "Error :" not in err.message


def test_surrogate_error_names_the_field_and_pairs_pass():
    err = refused(decode_json, b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
    assert err.param == "messages.0.content"
    assert decode_json(b'{"x": "\\ud83d\\ude00"}') == {"x": "\U0001f600"}  # a valid pair is one character


def test_v1_more_instances_than_the_server_can_hold_is_400_naming_the_limit():
    body = json.dumps({"instances": ["a", "b", "c"]}).encode()
    assert len(decode_v1(body, 3).instances) == 3
    err = refused(decode_v1, body, 2)
    assert err.param == "instances" and "at most 2" in err.message


@pytest.mark.parametrize(
    ("inputs", "param"),
    [
        ([{"name": "t", "shape": [0], "datatype": "BYTES", "data": []}], "inputs.0.data"),  # empty, no id
        ([{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["\ud800"]}], "inputs.0.data.0"),
        ([{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a"]}], "inputs.0.shape"),
        ([{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a", "b"]}], "inputs.0.shape"),
        ([{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}] * 2, "inputs"),  # a second input
        ([{"name": "t", "shape": [1], "datatype": "FP32", "data": [1.0]}], "inputs.0.datatype"),
        ([{"name": "t", "shape": [-1], "datatype": "BYTES", "data": ["a"]}], "inputs.0.shape"),
        ([{"name": "t", "shape": [1], "datatype": "BYTES", "data": [1]}], "inputs.0.data"),
        ([{"name": "t", "shape": [100], "datatype": "BYTES", "data": ["a"] * 100}], "inputs.0.shape"),
    ],
)
def test_v2_tensor_checks(inputs, param):
    raw = json.dumps({"inputs": inputs}).encode()  # json.dumps writes a lone surrogate as its \\ud800 escape
    err = refused(decode_v2_json, raw, 8)
    assert err.param == param, err.message


def test_v2_json_ok_and_nested_data_is_row_major():
    req = decode_v2_json(v2([{"name": "t", "shape": [2, 2], "datatype": "BYTES", "data": [["a", "b"], ["c", "d"]]}],
                            parameters={"max_tokens": 3}), 8)
    assert req.prompts == ["a", "b", "c", "d"] and req.parameters.max_tokens == 3 and req.id is None


def binary_body(texts: list[str], declared: int | None = None) -> tuple[bytes, str]:
    blob = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    header = json.dumps({"inputs": [{"name": "t", "shape": [len(texts)], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob) if declared is None else declared}}]})
    return header.encode() + blob, str(len(header.encode()))


def test_v2_binary_tensors():
    raw, size = binary_body(["héllo", "x"])
    assert decode_v2_binary(raw, size, 8).prompts == ["héllo", "x"]
    raw, size = binary_body(["hello"], declared=10_000)  # declared size past the body: struct.error before
    assert "binary_data_size" in refused(decode_v2_binary, raw, size, 8).message
    raw, size = binary_body(["hello"])
    refused(decode_v2_binary, raw[:-2], size, 8)  # an element runs past the data
    refused(decode_v2_binary, raw, "10000", 8)  # header length past the body
    refused(decode_v2_binary, raw, "x", 8)
    bad = raw.replace(b"hello", b"\xed\xa0\x80he")  # an encoded surrogate in an element
    assert "UTF-8" in refused(decode_v2_binary, bad, size, 8).message


def test_one_error_shape_per_protocol():
    exc = invalid("bad value", param="max_tokens")
    assert error_body(exc, "/v1/chat/completions") == {"error": {"message": "bad value", "type": "invalid_request_error",
                                                                 "param": "max_tokens", "code": None}}
    assert error_body(exc, "/openai/v1/completions")["error"]["param"] == "max_tokens"
    assert error_body(exc, "/v2/models/m/infer") == {"error": "max_tokens: bad value"}
    assert error_body(exc, "/v1/models/m:predict") == {"error": "max_tokens: bad value"}


async def test_body_limit_middleware_answers_413_and_passes_smaller_bodies():
    seen: list[bytes] = []

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run(chunks: list[bytes], path: str, declared: int | None = None) -> tuple[int, bytes]:
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        sent: list[dict] = []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        headers = [] if declared is None else [(b"content-length", str(declared).encode())]
        await BodyLimitMiddleware(app, limit=10)({"type": "http", "path": path, "headers": headers}, receive, send)
        assert not messages  # the whole body was read (and dropped), so the client gets its answer
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    assert await run([b"12345", b"67890"], "/v1/completions") == (200, b"ok")
    status, body = await run([b"123456", b"789012"], "/v2/models/m/infer")  # chunked: counted as it arrives
    assert status == 413 and "limit of 10 bytes" in json.loads(body)["error"]
    status, body = await run([b"x" * 11], "/v1/chat/completions", declared=11)  # declared: before reading
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    assert seen == [b"1234567890"]


async def test_a_client_waiting_for_100_continue_gets_its_413_without_sending_the_body():
    async def app(scope, receive, send):  # pragma: no cover - never reached
        raise AssertionError("the app must not run")

    received: list[dict] = []
    sent: list[dict] = []

    async def receive():
        received.append({})  # reading would make the server send "100 Continue"
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    headers = [(b"content-length", b"40000000"), (b"expect", b"100-continue")]
    await BodyLimitMiddleware(app, limit=10)({"type": "http", "path": "/v2/models/m/infer", "headers": headers},
                                             receive, send)
    assert sent[0]["status"] == 413 and received == []

"""Clients of a running stack (cli.launcher.Stack), as users run them: the official openai SDK, a gRPC
stub, and plain JSON POSTs for routes the SDK lacks."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import grpc
import openai

from cli.launcher import Stack
from tandem.v1 import generation_pb2_grpc


def openai_client(stack: Stack) -> openai.OpenAI:
    """The openai SDK on the gateway's HTTP API (no retries: a test sees the first answer)."""
    assert stack.gateway is not None
    return openai.OpenAI(base_url=f"http://{stack.gateway.info['http_address']}/v1", api_key="unused",
                         max_retries=0, timeout=60)


def grpc_stub(stack: Stack) -> generation_pb2_grpc.GenerationStub:
    return generation_pb2_grpc.GenerationStub(grpc.insecure_channel(stack.address))


def post_json(stack: Stack, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST `body` as JSON to the gateway's HTTP API: (status, parsed JSON reply), errors included."""
    assert stack.gateway is not None
    req = urllib.request.Request(f"http://{stack.gateway.info['http_address']}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())

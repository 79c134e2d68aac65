"""One benchmark request over gRPC or the OpenAI HTTP API, timed as its tokens arrive.

A `Client` is used from one asyncio loop; `send` never raises for a failed request: the failure is
recorded in the result (`ok=False`, `error`), so one bad request cannot end a run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Protocol

from cli.serving_bench.workload import BenchRequest


@dataclass
class RequestResult:
    """What one request saw. Times are seconds; `chunks` are (seconds after send, tokens in it)."""

    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    sent_at: float = 0.0  # time.monotonic() when sent
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for single-token outputs."""
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive chunks (one token each, unless the server batched some)."""
        times = [t for t, _ in self.chunks]
        return [b - a for a, b in zip(times, times[1:], strict=False)]


class Client(Protocol):
    name: str

    async def send(self, req: BenchRequest, timeout_s: float) -> RequestResult: ...

    async def close(self) -> None: ...


class GrpcClient:
    """Streams `tandem.v1.Generation/Generate` from a gateway at `addr` (host:port)."""

    name = "tandem-grpc"

    def __init__(self, addr: str, temperature: float = 0.0) -> None:
        import grpc

        from server.grpc_server import channel_options
        from tandem.v1 import generation_pb2_grpc

        self._channel = grpc.aio.insecure_channel(addr, options=channel_options())
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self.temperature = temperature

    async def send(self, req: BenchRequest, timeout_s: float) -> RequestResult:
        import grpc

        from tandem.v1 import generation_pb2 as gen

        sampling = gen.SamplingParams(temperature=self.temperature, max_tokens=req.max_tokens, ignore_eos=True)
        msg = gen.GenerateRequest(sampling=sampling)
        if req.prompt_token_ids is not None:
            msg.prompt_token_ids.extend(req.prompt_token_ids)
        else:
            msg.prompt = req.prompt or ""
        res = RequestResult(sent_at=time.monotonic())
        try:
            async for resp in self._stub.Generate(msg, timeout=timeout_s):
                now = time.monotonic() - res.sent_at
                if resp.token_ids:
                    res.chunks.append((now, len(resp.token_ids)))
                if resp.finish_reason:
                    res.prompt_tokens, res.output_tokens = resp.usage.prompt_tokens, resp.usage.completion_tokens
        except grpc.aio.AioRpcError as exc:
            res.error = f"{exc.code().name}: {exc.details()}"
            return res
        return _finish(res)

    async def close(self) -> None:
        await self._channel.close()


class HttpClient:
    """Streams `POST /v1/completions` (server-sent events, usage in the last chunk) from `base_url`;
    `model` is sent when given (Tandem serves one model and needs none)."""

    name = "tandem-http"

    def __init__(self, base_url: str, temperature: float = 0.0, model: str | None = None) -> None:
        import aiohttp

        self.url = base_url.rstrip("/") + "/v1/completions"
        self.model = model
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.temperature = temperature

    async def send(self, req: BenchRequest, timeout_s: float) -> RequestResult:
        import aiohttp

        prompt = list(req.prompt_token_ids) if req.prompt_token_ids is not None else req.prompt
        body = {"prompt": prompt, "max_tokens": req.max_tokens, "temperature": self.temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        res = RequestResult(sent_at=time.monotonic())
        try:
            async with self._session.post(self.url, json=body,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                if resp.status != 200:
                    res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    return res
                async for line in resp.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        res.error = str(chunk["error"].get("message"))
                        return res
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        res.chunks.append((time.monotonic() - res.sent_at, 1))
                    if chunk.get("usage"):
                        res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        res.output_tokens = chunk["usage"]["completion_tokens"]
        except (aiohttp.ClientError, TimeoutError) as exc:
            res.error = f"{type(exc).__name__}: {exc}"
            return res
        return _finish(res)

    async def close(self) -> None:
        await self._session.close()


def _finish(res: RequestResult) -> RequestResult:
    res.e2e_s = time.monotonic() - res.sent_at
    if not res.chunks:
        res.error = "the stream ended without a token"
        return res
    res.ttft_s = res.chunks[0][0]
    res.output_tokens = res.output_tokens or sum(n for _, n in res.chunks)
    res.ok = True
    return res

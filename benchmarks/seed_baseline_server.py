"""The seed article's streaming endpoint, as the article writes it, as a baseline.

FastAPI ``StreamingResponse`` over an async generator that yields one
``data: {json.dumps({"token": ...})}\\n\\n`` event per token, then ``data: [DONE]``.
Instead of vLLM it produces tokens at the synthetic engine's rate: the prompt's words, cycled,
one per token, ``asyncio.sleep(itl)`` before each (the article's loop has no other pacing).

    .venv/bin/python benchmarks/seed_baseline_server.py --port 8001 --itl-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse


def create_app(itl_s: float) -> FastAPI:
    app = FastAPI()

    async def generate_tokens(prompt: str, max_tokens: int = 256) -> AsyncIterator[str]:
        words = itertools.cycle(prompt.split() or ["tok"])
        for _ in range(max_tokens):
            await asyncio.sleep(itl_s)
            token_text = next(words) + " "
            yield f"data: {json.dumps({'token': token_text})}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions/stream")
    async def stream_completion(request: dict) -> StreamingResponse:
        prompt = request.get("prompt", "")
        max_tokens = request.get("max_tokens", 256)
        return StreamingResponse(
            generate_tokens(prompt, max_tokens), media_type="text/event-stream"
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    uvicorn.run(create_app(args.itl_ms / 1000.0), host="127.0.0.1", port=args.port,
                log_level=args.log_level)  # fmt: skip


if __name__ == "__main__":
    main()

"""Time to first token of a fresh long prompt, tokenspout's embedded engine against llama.cpp's
``llama-server``, side by side in one run.

    .venv/bin/python benchmarks/long_prompt_ttft.py --llama-server PATH \\
        [--tokens 1000] [--rounds 3] [-- extra tokenspout serve arguments]

Both servers load the same GGUF (the default model) with 2 threads. Each round sends each
server a prompt of ``--tokens`` tokens that neither has seen (a numbered header and seeded
random words, different per request, so no prefix cache helps), alone, on
``/v1/completions`` with ``stream: true`` and ``max_tokens: 1``; TTFT is the time from sending
the request to the first text chunk, on the client. The order of the two servers alternates
between rounds. Build llama-server with ``../shared/tools/build_llama_server.sh``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import httpx

from harness import ServerProcess, free_port, machine, tokenspout_serve
from tokenspout.engine.model_files import ModelFiles
from tokenspout.engine.tokenizer import Tokenizer

WORDS = (
    "river stone light market winter garden letter engine silver forest paper harbor "
    "window mountain signal story number orange castle morning thunder valley pocket "
    "mirror bridge candle island meadow rocket shadow velvet wonder yellow anchor"
).split()


def fresh_prompt(tokenizer: Tokenizer, tokens: int, index: int) -> str:
    """Text of exactly ``tokens`` tokens (by the model's tokenizer), unique from its start."""
    rng = random.Random(index)
    words = [f"Document {index}-{rng.randrange(10**9)}:"]
    while len(tokenizer.encode(" ".join(words))) < tokens:
        words.append(rng.choice(WORDS))
    while len(tokenizer.encode(" ".join(words))) > tokens:
        words.pop()
    return " ".join(words)


def first_token_ms(port: int, prompt: str) -> tuple[float, int]:
    """TTFT in ms of one streamed completion, and the prompt's token count as served."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "stream": True,
                "temperature": 0, "stream_options": {"include_usage": True}}  # fmt: skip
        ttft, prompt_tokens = None, -1
        start = time.perf_counter()
        with client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if ttft is None and choices and choices[0].get("text"):
                    ttft = (time.perf_counter() - start) * 1e3
                if chunk.get("usage"):
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
    if ttft is None:
        raise RuntimeError(f"no text from the server on port {port}")
    return ttft, prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("serve_args", nargs="*", help="extra `tokenspout serve` arguments")
    args = parser.parse_args()
    files = ModelFiles.resolve(None)
    tokenizer = Tokenizer.from_metadata(files.metadata()["tokenizer"])
    print(f"machine: {machine()}")
    ours_port, theirs_port = free_port(), free_port()
    ours_cmd = tokenspout_serve(ours_port, *args.serve_args)
    context = 2 * args.tokens + 64
    theirs_cmd = [args.llama_server, "-m", str(files.path), "-t", "2", "-np", "1",
                  "-c", str(context), "--port", str(theirs_port)]  # fmt: skip
    times: dict[str, list[float]] = {"tokenspout": [], "llama.cpp": []}
    served: dict[str, set[int]] = {"tokenspout": set(), "llama.cpp": set()}
    index = 0
    with (
        ServerProcess(ours_cmd, ours_port, ready_s=600),
        ServerProcess(theirs_cmd, theirs_port, ready_s=600),
    ):
        servers = [("tokenspout", ours_port), ("llama.cpp", theirs_port)]
        # One short request each first: the first request of a process pays for lazy setup.
        for _, port in servers:
            first_token_ms(port, fresh_prompt(tokenizer, 16, -1))
        for r in range(args.rounds):
            for name, port in servers if r % 2 == 0 else servers[::-1]:
                index += 1
                prompt = fresh_prompt(tokenizer, args.tokens, index)
                ttft, prompt_tokens = first_token_ms(port, prompt)
                times[name].append(ttft)
                served[name].add(prompt_tokens)
                print(f"round {r + 1} {name}: {ttft:.0f} ms ({prompt_tokens} prompt tokens)",
                      flush=True)  # fmt: skip
    print("\n| server | prompt tokens | TTFT median | TTFT runs (ms) |\n|---|---|---|---|")
    for name, values in times.items():
        runs = " / ".join(f"{v:.0f}" for v in values)
        lengths = ", ".join(map(str, sorted(served[name])))
        print(f"| {name} | {lengths} | {statistics.median(values):.0f} ms | {runs} |")
    ratio = statistics.median(times["tokenspout"]) / statistics.median(times["llama.cpp"])
    print(f"| **ratio** | | **{ratio:.2f}x** | |")


if __name__ == "__main__":
    main()

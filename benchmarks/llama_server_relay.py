"""tokenspout in front of llama.cpp's ``llama-server`` (a third-party upstream), serving the
default GGUF (SmolLM2-135M-Instruct): greedy text through tokenspout equals llama.cpp's own,
the relay's added TTFT and its tokens/s, a cancel through tokenspout freeing the
llama.cpp slot (``GET /slots``), and an upstream killed mid-answer (two llama-servers behind
one tokenspout): the client still gets llama.cpp's exact greedy answer and usage.

    .venv/bin/python benchmarks/llama_server_relay.py --llama-server PATH/llama-server

``llama-server`` runs with ``-t 2 -np 4`` (two threads, four slots); tokenspout with
``--engine upstream --upstream http://127.0.0.1:PORT/v1``. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from harness import ServerProcess, free_port, machine, tokenspout_serve
from tokenspout.engine.model_files import ModelFiles

MODEL = "smollm2"
QUESTIONS = [
    "What is the capital of France?",
    "Explain why the sky is blue.",
    "Write a haiku about the sea.",
    "List three primary colours.",
]


def chat(client: httpx.Client, question: str, *, stream: bool, max_tokens: int = 64) -> str:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]
    text = []
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(text)


def ttft(port: int) -> float:
    """Seconds from sending a streamed chat request to its first content."""
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": QUESTIONS[0]}],
         "temperature": 0, "max_tokens": 8, "stream": True}
    ).encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.perf_counter()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        data = b""
        while b'"content":"' not in data.replace(b'"content":""', b""):
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("stream closed early")
            data += chunk
        first = time.perf_counter() - start
        while sock.recv(65536):
            pass
    return first


def busy_slots(llama: httpx.Client) -> int:
    return sum(1 for s in llama.get("/slots").json() if s.get("is_processing"))


def cancel_once(front: int, llama: httpx.Client) -> float:
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": QUESTIONS[1]}],
         "max_tokens": 2000, "stream": True}
    ).encode()  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", front))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    data = b""
    while b'"content":"' not in data.replace(b'"content":""', b""):
        data += sock.recv(65536)
    assert busy_slots(llama) == 1
    closed = time.perf_counter()
    sock.close()
    while busy_slots(llama) != 0:
        if time.perf_counter() - closed > 30:
            raise RuntimeError("the llama.cpp slot was not freed")
        time.sleep(0.002)
    return time.perf_counter() - closed


#: Failover questions: English, and answers whose characters take several tokens (llama.cpp
#: sends those tokens in one chunk, so chunks do not count tokens).
FAILOVER_QUESTIONS = [
    "Explain why the sky is blue.",
    "List three primary colours with emoji.",
    "Translate 'good morning' into Japanese and explain.",
]


def failover_once(front: int, dying: ServerProcess, question: str) -> tuple[str, dict, bool]:
    """A greedy chat streamed through ``front``; ``dying`` (its first upstream) SIGKILLed
    after the fifth content chunk. The text, the usage and whether ``[DONE]`` came."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}],
            "temperature": 0, "max_tokens": 120, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    texts, usage, done = [], {}, False
    url = f"http://127.0.0.1:{front}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if chunk.get("choices"):
                    texts.append(chunk["choices"][0]["delta"].get("content") or "")
                if len(texts) == 5 and dying.proc is not None and dying.proc.poll() is None:
                    dying.proc.send_signal(signal.SIGKILL)
    return "".join(texts), usage, done


def failover_trials(llama_server: str, gguf: Path) -> None:
    """Per question: two fresh llama-servers behind a fresh front, the first killed
    mid-answer; the client's text must be llama.cpp's own uncut greedy answer."""
    print("\n| question (greedy, max_tokens 120) | upstream killed mid-answer: text == uncut | "
          "usage == uncut | [DONE] |")  # fmt: skip
    print("|---|---|---|---|")
    for question in FAILOVER_QUESTIONS:
        a, b, f = free_port(), free_port(), free_port()
        urls = ("--upstream", f"http://127.0.0.1:{a}/v1", "--upstream", f"http://127.0.0.1:{b}/v1")
        with ExitStack() as stack:
            dying = stack.enter_context(ServerProcess(llama_cmd(llama_server, gguf, a, 1), a))
            stack.enter_context(ServerProcess(llama_cmd(llama_server, gguf, b, 1), b))
            front = tokenspout_serve(f, "--engine", "upstream", *urls)
            stack.enter_context(ServerProcess(front, f))
            whole = httpx.post(
                f"http://127.0.0.1:{b}/v1/chat/completions", timeout=120,
                json={"model": MODEL, "messages": [{"role": "user", "content": question}],
                      "temperature": 0, "max_tokens": 120},
            ).json()  # fmt: skip
            uncut, uncut_usage = whole["choices"][0]["message"]["content"], whole["usage"]
            text, usage, done = failover_once(f, dying, question)
            counts = ("prompt_tokens", "completion_tokens")
            same_usage = all(usage.get(k) == uncut_usage[k] for k in counts)
            print(f"| {question} | {text == uncut} ({len(text)} chars) | {same_usage} "
                  f"({usage.get('completion_tokens')} tokens) | {done} |")  # fmt: skip


def llama_cmd(llama_server: str, gguf: Path, port: int, threads: int = 2) -> list[str]:
    return [llama_server, "-m", str(gguf), "--alias", MODEL, "-t", str(threads), "-np", "4",
            "--host", "127.0.0.1", "--port", str(port), "--slots"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--ttft-trials", type=int, default=20)
    parser.add_argument("--cancel-trials", type=int, default=10)
    parser.add_argument("--rate-rounds", type=int, default=6)
    args = parser.parse_args()
    print(machine())
    gguf = ModelFiles.resolve(None).path
    lp, fp = free_port(), free_port()
    front_cmd = tokenspout_serve(
        fp, "--engine", "upstream", "--upstream", f"http://127.0.0.1:{lp}/v1"
    )
    with ExitStack() as stack:
        stack.enter_context(ServerProcess(llama_cmd(args.llama_server, gguf, lp), lp))
        stack.enter_context(ServerProcess(front_cmd, fp))
        # A connection per request: llama-server closed kept-alive ones under the client.
        close = {"Connection": "close"}
        llama = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{lp}", timeout=120, headers=close)
        )
        through = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{fp}", timeout=120, headers=close)
        )
        print("\n| question | llama.cpp == through tokenspout (streamed, whole) |")
        print("|---|---|")
        for q in QUESTIONS:
            own = chat(llama, q, stream=False)
            same = own == chat(through, q, stream=True) == chat(through, q, stream=False)
            print(f"| {q} | {same} ({len(own)} chars) |")
        direct, relayed = [], []
        for _ in range(args.ttft_trials):
            direct.append(ttft(lp))
            relayed.append(ttft(fp))
        d, r = statistics.median(direct), statistics.median(relayed)
        print(
            f"\nTTFT ({args.ttft_trials} each, alternating): llama.cpp p50 {d * 1000:.1f} ms, "
            f"through tokenspout p50 {r * 1000:.1f} ms, added {(r - d) * 1000:.2f} ms"
        )
        # Rounds of the questions one after another, direct and through in turn (the order
        # alternating): on a shared machine, only ratios side by side compare.
        print("\n| round | llama.cpp chars/s | through tokenspout chars/s | ratio |")
        print("|---|---|---|---|")
        ratios = []
        for i in range(args.rate_rounds):
            pair = [("llama.cpp", llama), ("through", through)]
            rates = {}
            for name, client in pair if i % 2 == 0 else pair[::-1]:
                start = time.perf_counter()
                chars = sum(len(chat(client, q, stream=True, max_tokens=128)) for q in QUESTIONS)
                rates[name] = chars / (time.perf_counter() - start)
            ratios.append(rates["through"] / rates["llama.cpp"])
            print(f"| {i + 1} | {rates['llama.cpp']:.1f} | {rates['through']:.1f} | "
                  f"{ratios[-1]:.3f} |")  # fmt: skip
        print(f"median ratio, through / direct: {statistics.median(ratios):.3f}")
        cancels = [cancel_once(fp, llama) for _ in range(args.cancel_trials)]
        p50, worst = statistics.median(cancels) * 1000, max(cancels) * 1000
        print(
            f"cancel through tokenspout → llama.cpp slot free ({args.cancel_trials} trials): "
            f"p50 {p50:.1f} ms, max {worst:.1f} ms"
        )
    failover_trials(args.llama_server, gguf)


if __name__ == "__main__":
    main()

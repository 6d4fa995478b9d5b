"""A model that cannot be served is one line on stderr and exit code 2, as any other setting
that cannot work, whether refused before the server starts or when the engine loads (a real
``tokenspout serve``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tokenspout.engine.model_files import ModelFiles


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenspout.cli", "serve", "--port", str(free_port()),
         "--log-level", "warning", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def cut_model(tmp_path: Path) -> str:
    """The default model's first 2000 bytes: a GGUF cut inside its header."""
    with ModelFiles.resolve(None).path.open("rb") as f:
        head = f.read(2000)
    path = tmp_path / "cut.gguf"
    path.write_bytes(head)
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Checked before the server starts.
        (["--max-model-len", "9000"],
         "max_model_len 9000 exceeds the model's context length 8192"),
        (["--model", cut_model],
         "cannot read GGUF file {tmp_path}/cut.gguf: it is truncated or damaged"),
        # When the engine loads: 430 TiB are past any address space. Slow (~10 s: the
        # scheduler's ten million free slots are listed first), so `make test-slow` has it.
        pytest.param(
            ["--max-num-seqs", "10000000"],
            "not enough memory for the KV cache of 10000000 sequences × 2048 tokens",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["context", "cut-header", "kv-cache"],
)  # fmt: skip
def test_a_model_that_cannot_be_served_is_one_line_and_exit_2(
    tmp_path: Path, args: list[object], message: str
) -> None:
    """Regression: each was a 60-80-line traceback and exit 3 ("Application startup failed"),
    and the cut header's IndexError named no file."""
    given = [a(tmp_path) if callable(a) else str(a) for a in args]
    result = serve(*given)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tokenspout serve: configuration error: ")
    assert message.format(tmp_path=tmp_path) in lines[0]

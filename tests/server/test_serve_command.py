"""``tokenspout serve``'s options as the command line parses them."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tokenspout.cli import app
from tokenspout.engine import block_kernels
from tokenspout.engine.cpu_budget import usable_cpus
from tokenspout.engine.weight_formats import FORMATS


def test_weights_offers_every_format_the_engine_loads() -> None:
    result = CliRunner().invoke(app, ["serve", "--weights", "int4"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "'int4' is not one of" in result.output
    for fmt in FORMATS:
        assert f"'{fmt}'" in result.output


def test_the_same_upstream_twice_is_refused() -> None:
    given = ["--upstream", "http://127.0.0.1:1/v1", "--upstream", "http://127.0.0.1:1/v1/"]
    result = CliRunner().invoke(app, ["serve", "--engine", "upstream", *given])
    assert result.exit_code == 2
    assert "--upstream http://127.0.0.1:1/v1 is given twice" in result.output


def test_threads_below_one_is_refused_before_the_model_loads() -> None:
    # -2 reached torch.set_num_threads at startup (a traceback, exit 3); 0 meant "all
    # cores, fixed", which no help text said.
    for threads in ("-2", "0"):
        result = CliRunner().invoke(app, ["serve", "--threads", threads])
        assert result.exit_code == 2
        assert "--threads" in result.output


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The engines ``serve`` would have served, instead of serving them."""
    engines: list[object] = []
    monkeypatch.setattr(
        "tokenspout.server.serve.serve", lambda app, state, **_: engines.append(state.engine)
    )
    return engines


def test_threads_above_the_usable_cpus_are_refused(served: list[object]) -> None:
    # --threads 1000 on two cores was taken: the first request waited a second.
    usable = usable_cpus()
    result = CliRunner().invoke(app, ["serve", "--threads", str(usable + 1)])
    assert result.exit_code == 2 and not served
    assert result.output == (
        f"tokenspout serve: configuration error: --threads {usable + 1} is more than the "
        f"{usable} CPU(s) this process may use\n"
    )


@pytest.mark.parametrize(
    ("args", "flag", "engine"),
    [
        (["--engine", "synthetic", "--model", "/x.gguf"], "--model", "synthetic"),
        (["--engine", "synthetic", "--weights", "fp16"], "--weights", "synthetic"),
        (["--engine", "synthetic", "--threads", "2"], "--threads", "synthetic"),
        (["--engine", "synthetic", "--no-prefix-cache"], "--prefix-cache", "synthetic"),
        (["--engine", "synthetic", "--max-prefill-tokens", "4"], "--max-prefill-tokens",
         "synthetic"),
        (["--engine", "upstream", "--upstream", "http://127.0.0.1:1/v1", "--max-num-seqs", "4"],
         "--max-num-seqs", "upstream"),
        (["--engine", "upstream", "--upstream", "http://127.0.0.1:1/v1", "--model", "/x"],
         "--model", "upstream"),
        (["--synthetic-itl-ms", "5"], "--synthetic-itl-ms", "embedded"),
        (["--upstream-retries", "3"], "--upstream-retries", "embedded"),
    ],
)  # fmt: skip
def test_an_engine_flag_the_engine_does_not_read_is_refused(
    served: list[object], args: list[str], flag: str, engine: str
) -> None:
    # They were silently ignored, while --upstream-* without --engine upstream was refused.
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2 and not served
    assert f"configuration error: {flag} does not apply to --engine {engine}" in result.output


def test_an_upstream_key_in_the_environment_does_not_stop_another_engine(
    served: list[object],
) -> None:
    # The variable is there for whichever engine runs; only the flag itself is refused.
    env = {"TOKENSPOUT_UPSTREAM_API_KEY": "secret"}
    result = CliRunner().invoke(app, ["serve", "--engine", "synthetic"], env=env)
    assert result.exit_code == 0, result.output
    assert [type(e).__name__ for e in served] == ["SyntheticEngine"]
    given = ["serve", "--engine", "synthetic", "--upstream-api-key", "secret"]
    assert CliRunner().invoke(app, given).exit_code == 2


@pytest.mark.parametrize(
    ("flag", "variable"),
    [("--api-key", "TOKENSPOUT_API_KEY"), ("--metrics-api-key", "TOKENSPOUT_METRICS_API_KEY")],
)
def test_an_empty_key_is_refused_but_an_empty_variable_means_none(
    served: list[object], flag: str, variable: str
) -> None:
    # `--api-key "$KEY"` with KEY unset started a server that answered 401 to everything.
    result = CliRunner().invoke(app, ["serve", "--engine", "synthetic", flag, ""])
    assert result.exit_code == 2 and not served
    assert f"configuration error: {flag} is empty (an unset shell variable?)" in result.output
    result = CliRunner().invoke(app, ["serve", "--engine", "synthetic"], env={variable: ""})
    assert result.exit_code == 0, result.output
    assert len(served) == 1


@pytest.mark.parametrize("flag", ["--api-key", "--metrics-api-key"])
@pytest.mark.parametrize("key", [" sk-a", "sk-a\n", "\tsk-a"])
def test_a_key_with_surrounding_whitespace_is_refused(
    served: list[object], flag: str, key: str
) -> None:
    # A bearer token is read without its surrounding spaces: such a key was taken and then
    # matched no request.
    result = CliRunner().invoke(app, ["serve", "--engine", "synthetic", flag, key])
    assert result.exit_code == 2 and not served
    assert f"configuration error: {flag} begins or ends with whitespace" in result.output
    assert "sk-a" not in result.output


def test_a_kernel_build_this_cpu_cannot_run_is_refused_before_the_model_loads(
    served: list[object],
) -> None:
    # TOKENSPOUT_KERNELS=bogus was read first as the model loaded: a 170-line traceback
    # from the engine's thread, exit 1.
    env = {block_kernels.ISA_VARIABLE: "bogus"}
    result = CliRunner().invoke(app, ["serve", "--threads", "1"], env=env)
    assert result.exit_code == 2 and not served
    runs = ", ".join(block_kernels.supported_isas()) or "none"
    assert result.output == (
        f"tokenspout serve: configuration error: TOKENSPOUT_KERNELS=bogus: this CPU runs {runs}\n"
    )
    # Only the embedded engine runs the kernels: the others do not read the variable.
    result = CliRunner().invoke(app, ["serve", "--engine", "synthetic"], env=env)
    assert result.exit_code == 0, result.output

"""``tokenspout serve``'s options as the command line parses them."""

from __future__ import annotations

from typer.testing import CliRunner

from tokenspout.cli import app
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

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

"""tokenspout: serve a model with streaming APIs, or complete a prompt live in the terminal."""

from __future__ import annotations

import typer

from tokenspout.client.cli import bench, complete
from tokenspout.server.serve_command import serve

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.command()(serve)
app.command()(complete)
app.command()(bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

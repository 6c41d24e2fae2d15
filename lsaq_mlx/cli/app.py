"""The Typer application every command registers on."""

from typing import Annotated

import typer

from lsaq_mlx import __version__

app = typer.Typer(
    name="lsaq-mlx",
    help="Make language models fit your Mac: score layer importance, give important layers more bits, "
    "write models stock mlx_lm opens, and hot-swap precision as memory changes.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"lsaq-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass

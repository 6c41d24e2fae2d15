"""``pack`` and ``unpack``: a model folder as one compressed, exactly lossless file."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from lsaq_mlx.cli.app import app
from lsaq_mlx.cli.options import ForceOption, JsonOption
from lsaq_mlx.cli.output import emit_json, err


@app.command()
def pack(
    folder: Annotated[Path, typer.Argument(help="A model folder (e.g. written by convert).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="PATH", help="Pack file to write (default: <folder>.lsaqpack).")] = None,
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Compress a model folder into one file, exactly lossless (every file's SHA-256 is kept and checked).

    --model accepts the file as it is (the weights are decoded straight into memory); unpack restores the folder.

    Example: lsaq-mlx pack out-4bpw -o out-4bpw.lsaqpack"""
    from lsaq_mlx.storage.model_pack import default_pack_path, pack_model

    target = out or default_pack_path(folder)
    report = pack_model(folder, target, force=force)
    if json_out:
        return emit_json(report.to_dict())
    err(f"wrote {target}: {report.raw_bytes / 1e6:.1f} MB -> {report.packed_bytes / 1e6:.1f} MB "
        f"({report.ratio:.3f}x), {report.files} files, {report.seconds:.1f} s")


@app.command()
def unpack(
    pack_file: Annotated[Path, typer.Argument(help="A file written by pack.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="PATH", help="Folder to write (default: the file's name without .lsaqpack).")] = None,
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Restore the model folder a pack holds, byte for byte (every file's SHA-256 is checked).

    Examples: lsaq-mlx unpack out-4bpw.lsaqpack -o out-4bpw"""
    from lsaq_mlx.storage.model_pack import default_unpack_path, unpack_model

    target = out or default_unpack_path(pack_file)
    report = unpack_model(pack_file, target, force=force)
    if json_out:
        return emit_json(report.to_dict())
    err(f"wrote {target}: {report.files} files, {report.raw_bytes / 1e6:.1f} MB, {report.seconds:.1f} s")

"""``list``: the models this machine has; ``cache list | rm | prune``: what lsaq-mlx
keeps in its cache, for which model, and removing it."""

from typing import Annotated

import typer

from lsaq_mlx.cli.app import app
from lsaq_mlx.cli.options import JsonOption, ModelOption
from lsaq_mlx.cli.output import emit_json, err
from lsaq_mlx.errors import UserError

cache_app = typer.Typer(help="What lsaq-mlx keeps in its cache ($LSAQ_MLX_CACHE, else ~/.cache/lsaq-mlx), and removing it.",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@app.command("list")
def list_models(json_out: JsonOption = False) -> None:
    """The models you have: folders written by convert (path, bits per weight, size, quantizer, source, when; gone if moved or deleted) and models imported into the cache.

    Examples: lsaq-mlx list · lsaq-mlx list --json"""
    from lsaq_mlx.cache_inventory import cache_entries
    from lsaq_mlx.model_index import converted_models

    converted = list(reversed(converted_models()))
    imported = [e for e in cache_entries() if e.kind == "models"]
    if json_out:
        return emit_json({"converted": [m.to_dict() for m in converted], "imported": [e.to_dict() for e in imported]})
    print(f"converted by lsaq-mlx convert: {len(converted)}")
    for m in converted:
        where = m.path if m.present else f"{m.path} (gone)"
        print(f"  {where:<48} {m.bits_per_weight:5.2f} bpw {_size(m.written_bytes):>10}  {m.quantizer:<8} "
              f"{m.method:<10} from {m.source}  {_age(m.written_at)}")
    print(f"imported into the cache: {len(imported)}")
    for e in imported:
        print(f"  {e.model or '?':<48} {_size(e.bytes):>10}  {_age(e.modified)}")


DryRunOption = Annotated[bool, typer.Option("--dry-run", metavar="", help="List what would be removed and its size; remove nothing.")]


@cache_app.command("list")
def list_cache(json_out: JsonOption = False) -> None:
    """Every cache entry: its kind, model, size and age.

    Example: lsaq-mlx cache list"""
    from lsaq_mlx.cache import cache_dir
    from lsaq_mlx.cache_inventory import KINDS, cache_entries

    entries = cache_entries()
    if json_out:
        return emit_json({"cache": str(cache_dir()), "entries": [e.to_dict() for e in entries],
                          "bytes": sum(e.bytes for e in entries)})
    print(f"{cache_dir()}: {len(entries)} entries, {_size(sum(e.bytes for e in entries))}")
    for e in entries:
        model = e.model or (e.model_fingerprint[:16] if e.model_fingerprint else "?")
        print(f"  {KINDS[e.kind]:<14} {model:<40} {_size(e.bytes):>10}  {_age(e.modified):>8}")


@cache_app.command("rm")
def remove_cache(
    model: ModelOption = None,
    all_entries: Annotated[bool, typer.Option("--all", metavar="", help="Everything in the cache.")] = False,
    dry_run: DryRunOption = False,
    json_out: JsonOption = False,
) -> None:
    """Remove what is cached for one model (its import, cost tables, scores, layer stores), or everything.

    Examples: lsaq-mlx cache rm -m ./my-model --dry-run · lsaq-mlx cache rm --all"""
    from lsaq_mlx.cache_inventory import cache_entries, remove

    if all_entries == (model is not None):
        raise UserError("say which: --model M, or --all")
    entries = cache_entries()
    if model is not None:
        fingerprint = _fingerprint(model)
        entries = [e for e in entries if e.model_fingerprint == fingerprint]
    _report(entries, _removed(entries, dry_run, remove), json_out, dry_run)


@cache_app.command("prune")
def prune_cache(
    older_than: Annotated[str, typer.Option("--older-than", metavar="AGE", help="Remove entries not written for this long: 30d, 12h, 90m.")] = "30d",
    dry_run: DryRunOption = False,
    json_out: JsonOption = False,
) -> None:
    """Remove the entries not written for a while.

    Example: lsaq-mlx cache prune --older-than 14d"""
    from lsaq_mlx.cache_inventory import cache_entries, older_than as old, remove

    entries = old(cache_entries(), _seconds(older_than))
    _report(entries, _removed(entries, dry_run, remove), json_out, dry_run)


def _fingerprint(spec: str) -> str:
    from lsaq_mlx.sources import resolve_model

    return resolve_model(spec).fingerprint


def _removed(entries, dry_run: bool, remove) -> int:
    """Bytes freed by removing ``entries``, or that would be (``dry_run``: nothing removed)."""
    return sum(e.bytes for e in entries) if dry_run else remove(entries)


def _report(entries, freed: int, json_out: bool, dry_run: bool = False) -> None:
    if json_out:
        return emit_json({"dry_run": dry_run, "removed": [e.to_dict() for e in entries], "bytes": freed})
    if dry_run:
        for e in entries:
            print(f"{e.kind:12} {_size(e.bytes):>10}  {e.path}")
    err(f"{'would remove' if dry_run else 'removed'} {len(entries)} entries, {_size(freed)}")


def _seconds(text: str) -> float:
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    try:
        value, unit = float(text[:-1]), units[text[-1]]
    except (ValueError, KeyError, IndexError):
        raise UserError(f"cannot read the age '{text}' (examples: 30d, 12h, 90m)", setting="older_than") from None
    if value < 0:
        raise UserError(f"the age must not be negative: {text}", setting="older_than")
    return value * unit


def _size(n: int) -> str:
    from lsaq_mlx.sizes import format_size

    return format_size(n)


def _age(modified: float) -> str:
    import time

    seconds = max(0.0, time.time() - modified)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return "just now"

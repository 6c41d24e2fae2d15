"""Names read from files that become paths (a pack's file list): one normalisation and
check for all of them, so no name can reach outside the folder it is written into."""

from pathlib import PurePosixPath

from lsaq_mlx.errors import UserError

MAX_NAME_BYTES = 1024
MAX_PART_BYTES = 255


def member_path(name, where: str) -> str:
    """``name`` as a normalised relative POSIX path (``a/./b`` -> ``a/b``), or a one-line
    ``UserError`` naming ``where`` it was read: not a string, empty, absolute, with
    ``..``, a backslash, a control character (NUL included), a hidden part, or too long."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{where} holds an unusable file name {name!r}")
    if any(ord(c) < 32 or c in "\\\x7f" for c in name):
        raise UserError(f"{where} holds a file name with a control character or backslash: {name!r}")
    path = PurePosixPath(name)
    parts = [p for p in path.parts if p != "."]
    if path.is_absolute() or not parts or ".." in parts:
        raise UserError(f"{where} holds a file name that points outside its folder: {name!r}")
    if any(p.startswith(".") for p in parts):
        raise UserError(f"{where} holds a hidden file name, which lsaq-mlx never writes: {name!r}")
    if len(name.encode()) > MAX_NAME_BYTES or any(len(p.encode()) > MAX_PART_BYTES for p in parts):
        raise UserError(f"{where} holds a file name that is too long: {name[:60]!r}...")
    return "/".join(parts)


def unique_member_paths(names, where: str) -> list[str]:
    """``member_path`` of each name; two names that normalise to the same path (also
    when letter case is ignored, as macOS file systems do) are refused."""
    seen: dict[str, str] = {}
    paths = []
    for name in names:
        path = member_path(name, where)
        folded = path.casefold()
        if folded in seen:
            raise UserError(f"{where} holds two entries for one file: {seen[folded]!r} and {name!r}")
        seen[folded] = name
        paths.append(path)
    folders = {str(parent).casefold() for p in paths for parent in PurePosixPath(p).parents}
    clash = next((p for p in paths if p.casefold() in folders), None)
    if clash is not None:
        raise UserError(f"{where} holds {clash!r} both as a file and as a folder")
    return paths

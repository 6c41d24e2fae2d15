"""Hostile model packs: crafted by the test from a genuine pack, they must not touch
anything outside their folder, claim another model's caches, or fill memory."""

import hashlib
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from lsaq_mlx.errors import UserError
from lsaq_mlx.sources import resolve_model
from lsaq_mlx.sources.folder import folder_fingerprint
from lsaq_mlx.storage.container import END, TRAILER
from lsaq_mlx.storage.model_pack import pack_model, unpack_model


@pytest.fixture(scope="module")
def genuine(tiny_llama, tmp_path_factory):
    """A pack of the tiny model's folder."""
    out = tmp_path_factory.mktemp("packs") / "tiny.lsaqpack"
    pack_model(tiny_llama.path, out)
    return out


@pytest.fixture
def victim(tmp_path):
    """A folder that must survive byte for byte (no config.json, like any folder of a user)."""
    folder = tmp_path / "victim"
    (folder / "sub").mkdir(parents=True)
    (folder / "authorized_keys").write_text("ssh-ed25519 AAAA... me@home\n")
    (folder / "sub" / "notes.txt").write_text("mine\n")
    return folder


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def craft(src: Path, dst: Path, edit, payload: bytes = b"") -> Path:
    """``src`` with its index changed by ``edit(index, offset)``, ``payload`` inserted
    before the index at ``offset``; the index hash and trailer are made to match, so
    only the reader's own checks stand between the crafted index and the disk."""
    data = src.read_bytes()
    offset, length, _, _ = TRAILER.unpack(data[-TRAILER.size:])
    index = json.loads(data[offset:offset + length])
    edit(index, offset)
    new = json.dumps(index).encode()
    at = offset + len(payload)
    dst.write_bytes(data[:offset] + payload + new + TRAILER.pack(at, len(new), hashlib.sha256(new).digest(), END))
    return dst


def add_file(index: dict, name: str, content: bytes, offset: int, codec="none", stored=None) -> None:
    """A file entry ``name`` whose one record is ``stored`` (default: ``content``) at ``offset``."""
    stored = content if stored is None else stored
    record = f"extra#{len(index['records'])}"
    index["records"].append({"name": record, "size": len(content), "sha256": hashlib.sha256(content).hexdigest(),
                             "transform": "none", "codec": codec, "chunks": [[offset, len(stored), len(content)]],
                             "meta": {}})
    index["meta"]["files"].append({"path": name, "size": len(content), "sha256": hashlib.sha256(content).hexdigest(),
                                   "records": [record]})


@pytest.mark.parametrize("claim", ["absolute", "relative"])
def test_a_pack_fingerprint_never_names_a_folder(genuine, tiny_llama, victim, tmp_path, claim):
    before = snapshot(victim)
    fake = str(victim) if claim == "absolute" else os.path.relpath(victim, Path(os.environ["LSAQ_MLX_CACHE"]) / "packs")

    def edit(index, offset):
        index["meta"]["fingerprint"] = fake

    source = resolve_model(str(craft(genuine, tmp_path / "claims.lsaqpack", edit)))
    assert snapshot(victim) == before
    assert source.fingerprint == folder_fingerprint(tiny_llama.path)  # recomputed from the content
    assert source.path.parent == Path(os.environ["LSAQ_MLX_CACHE"]) / "packs"


BAD_NAMES = ["../escape.txt", "/tmp/lsaq-absolute.txt", "a/../../escape.txt", "sub/\x00nul.txt", ".ssh/authorized_keys",
             "x" * 300, "..\\escape.txt", "authorized_keys/../../../escape.txt", ""]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_file_names_that_leave_the_folder_are_refused(genuine, victim, tmp_path, name):
    before = snapshot(victim)
    os.chdir(victim / "sub")  # a relative name would resolve from here
    pack = craft(genuine, tmp_path / "escape.lsaqpack", lambda i, o: add_file(i, name, b"owned\n", o), b"owned\n")
    with pytest.raises(UserError) as e:
        resolve_model(str(pack))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError):
        unpack_model(pack, tmp_path / "out")
    assert snapshot(victim) == before and not (tmp_path / "out").exists()
    assert not Path("/tmp/lsaq-absolute.txt").exists() and not (tmp_path / "escape.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escape.lsaqpack", "victim"]


@pytest.mark.parametrize("twin", ["./config.json", "CONFIG.json", "config.json/x"])
def test_two_entries_for_one_file_are_refused(genuine, tiny_llama, tmp_path, twin):
    pack = craft(genuine, tmp_path / "twin.lsaqpack", lambda i, o: add_file(i, twin, b'{"model_type": "evil"}', o),
                 b'{"model_type": "evil"}')
    for attempt in (lambda: resolve_model(str(pack)), lambda: unpack_model(pack, tmp_path / "out")):
        with pytest.raises(UserError, match="two entries for one file|both as a file and as a folder"):
            attempt()
    assert not (tmp_path / "out").exists()


def test_a_pack_cannot_claim_another_models_caches(genuine, tiny_llama, tmp_path):
    """A pack of a different model that claims the genuine one's fingerprint gets its own
    cache entry: the genuine pack still loads its own config, and unpack checks hashes."""
    other = tmp_path / "other"
    unpack_model(genuine, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (other / "config.json").write_text(json.dumps(config))
    impostor = tmp_path / "impostor.lsaqpack"
    pack_model(other, impostor)
    claimed = json.loads(json.dumps(folder_fingerprint(tiny_llama.path)))

    def claim(index, offset):
        index["meta"]["fingerprint"] = claimed

    impostor = craft(impostor, tmp_path / "claims.lsaqpack", claim)
    first, second = resolve_model(str(impostor)), resolve_model(str(genuine))
    assert first.fingerprint != second.fingerprint == folder_fingerprint(tiny_llama.path)
    assert json.loads((second.path / "config.json").read_text())["rms_norm_eps"] != 0.5
    assert json.loads((first.path / "config.json").read_text())["rms_norm_eps"] == 0.5


def test_a_file_whose_bytes_differ_from_its_hash_is_refused(genuine, tmp_path):
    content = b"tampered"
    def edit(index, offset):
        add_file(index, "notes.txt", content, offset)
        index["meta"]["files"][-1]["sha256"] = hashlib.sha256(b"other").hexdigest()

    pack = craft(genuine, tmp_path / "tampered.lsaqpack", edit, content)
    with pytest.raises(UserError, match="SHA-256"):
        unpack_model(pack, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _peak_rss_of_unpack(pack: Path, out: Path) -> tuple[int, str]:
    """Peak resident memory (bytes) of a fresh process that unpacks ``pack``, and its error."""
    code = ("import resource, sys\n"
            "from lsaq_mlx.errors import UserError\n"
            "from lsaq_mlx.storage.model_pack import unpack_model\n"
            "error = ''\n"
            "try:\n    unpack_model(sys.argv[1], sys.argv[2])\n"
            "except UserError as e:\n    error = str(e)\n"
            "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(rss if sys.platform == 'darwin' else rss * 1024)\nprint(error)\n")
    done = subprocess.run([sys.executable, "-c", code, str(pack), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rss, error = done.stdout.splitlines()[:2] if "\n" in done.stdout.strip() else (done.stdout.strip(), "")
    return int(rss), error


def test_decompression_bombs_stay_within_their_declared_size(genuine, tmp_path):
    """Records that declare 16 bytes but decode to 1 GiB (zstd with and without the frame's
    content size) or name a codec containers do not use: refused, and the unpacking
    process's peak memory stays that of a genuine unpack plus a small multiple of the
    bytes it declares and reads."""
    import zstandard

    gib = 1 << 30
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(gib))
    streamed = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(gib))
    deflated = zlib.compress(bytes(gib), 1)
    baseline, error = _peak_rss_of_unpack(genuine, tmp_path / "genuine")
    assert error == ""
    bombs = {"zstd-1": frame, "zstd-3": streamed, "zlib-1": deflated}
    for codec_name, stored in bombs.items():
        pack = craft(genuine, tmp_path / f"bomb-{codec_name}.lsaqpack",
                     lambda i, o: add_file(i, "bomb.bin", bytes(16), o, codec_name, stored), stored)
        peak, error = _peak_rss_of_unpack(pack, tmp_path / f"out-{codec_name}")
        assert error, f"{codec_name}: the bomb was unpacked"
        declared = 16 + len(stored)
        assert peak - baseline <= 4 * declared + (32 << 20), (codec_name, peak - baseline, error)
        assert not (tmp_path / f"out-{codec_name}").exists()


def test_a_chunk_that_declares_more_than_a_chunk_is_refused_before_decoding(genuine, tmp_path):
    def edit(index, offset):
        add_file(index, "huge.bin", bytes(16), offset)
        index["records"][-1]["chunks"][0][2] = 64 << 30
        index["records"][-1]["size"] = index["meta"]["files"][-1]["size"] = 64 << 30

    pack = craft(genuine, tmp_path / "huge.lsaqpack", edit, bytes(16))
    with pytest.raises(UserError, match="more than a chunk holds"):
        unpack_model(pack, tmp_path / "out")


def test_links_out_of_a_folder_are_not_packed(tiny_llama, tmp_path):
    folder = tmp_path / "linked"
    unpack = tmp_path / "src.lsaqpack"
    pack_model(tiny_llama.path, unpack)
    unpack_model(unpack, folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (folder / "inside.txt").write_text("kept")
    (folder / "alias.txt").symlink_to(folder / "inside.txt")
    pack_model(folder, tmp_path / "ok.lsaqpack")
    unpack_model(tmp_path / "ok.lsaqpack", tmp_path / "ok")
    assert (tmp_path / "ok" / "alias.txt").read_text() == "kept" and not (tmp_path / "ok" / "alias.txt").is_symlink()
    (folder / "leak.txt").symlink_to(secret)
    with pytest.raises(UserError, match="outside the folder"):
        pack_model(folder, tmp_path / "leak.lsaqpack")
    assert not (tmp_path / "leak.lsaqpack").exists()


def test_large_files_besides_the_weights_do_not_reach_the_cache(genuine, tmp_path, monkeypatch):
    from lsaq_mlx.sources import pack as pack_sources

    monkeypatch.setattr(pack_sources, "MAX_SMALL_FILE_BYTES", 4096)  # the rule, not its size, is tested
    content = os.urandom(8192)
    pack = craft(genuine, tmp_path / "stuffed.lsaqpack", lambda index, offset: add_file(index, "notes.bin", content, offset),
                 content)
    with pytest.raises(UserError, match="notes.bin of 8.2 KB; files besides the weights may take"):
        resolve_model(str(pack))
    monkeypatch.setattr(pack_sources, "MAX_SMALL_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(pack_sources, "MAX_SMALL_FILES_BYTES", 4096)
    with pytest.raises(UserError, match="of files besides the weights; at most"):
        resolve_model(str(pack))

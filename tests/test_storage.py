import hashlib
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from cli_run import assert_one_line_error, run_cli
from lsaq_mlx.backend.compute import prepare_for_compute
from lsaq_mlx.convert import convert, quantized_model
from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.methods import PlanningContext, plan_uniform
from lsaq_mlx.planning.planner import Planner, PlanRequest
from lsaq_mlx.runtime.events import EngineError, Swapped
from lsaq_mlx.planning.planner import FixedPlans
from lsaq_mlx.runtime import Engine
from lsaq_mlx.runtime.options import RuntimeOptions
from lsaq_mlx.runtime.swap import module_maker, swap_modules
from lsaq_mlx.sources.tensors import SourceTensors
from lsaq_mlx.sources import load_model, resolve_model
from lsaq_mlx.storage import codecs, transforms
from lsaq_mlx.storage.container import ContainerReader
from lsaq_mlx.storage.layer_store import LayerStore
from lsaq_mlx.storage.model_pack import pack_model
from tiny_models import tiny_model, write_gguf

TOKENS = mx.array([[1, 5, 9, 200, 42, 7, 256]])
# every code width the transforms treat differently, and float16 modules
OVERRIDES = ["q_proj=2:32", "k_proj=8", "v_proj=5:32", "o_proj=6", "down_proj=4:32", "lm_head=keep"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A float source (a tiny llama imported from GGUF) and a mixed-precision model
    converted from it, in a cache of their own."""
    root = tmp_path_factory.mktemp("storage")
    old = os.environ.get("LSAQ_MLX_CACHE")
    os.environ["LSAQ_MLX_CACHE"] = str(root / "cache")
    write_gguf(tiny_model("llama"), "llama", root / "tiny.gguf")
    source = resolve_model(str(root / "tiny.gguf"))
    plan = Planner(source).plan(PlanRequest(method="uniform", bits=3, overrides=OVERRIDES))
    convert(source, plan, root / "mixed")
    yield root, source
    if old is None:
        os.environ.pop("LSAQ_MLX_CACHE", None)
    else:
        os.environ["LSAQ_MLX_CACHE"] = old


def file_hashes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def logits(source):
    model, _, _ = load_model(source)
    return np.array(model(TOKENS))


@pytest.mark.parametrize("name", ["none", "shuffle:2", "shuffle:4", "delta:2"]
                         + [f"codes:{b}" for b in range(1, 9)] + [f"bitplanes:{b}" for b in range(1, 9)])
def test_transforms_invert_exactly(name):
    rng = np.random.default_rng(0)
    unit = transforms.unit_bytes(name)
    for units in (1, 3, 1000):
        data = rng.integers(0, 256, unit * units, dtype=np.uint8).tobytes()
        moved = transforms.forward(name, data)
        assert transforms.inverse(name, moved) == data
    if unit > 1:
        with pytest.raises(ValueError, match="multiple"):
            transforms.forward(name, data + b"x")


@pytest.mark.parametrize("name", ["zip", "none:2", "shuffle", "codes:9", "delta:4", "shuffle:x"])
def test_unknown_transforms_are_refused(name):
    with pytest.raises(ValueError):
        transforms.parse(name)


def test_codes_regroups_mlx_packing_so_no_code_straddles_a_byte():
    w = mx.random.normal((4, 64), key=mx.random.key(1))
    q, scales, biases = mx.quantize(w, 32, 3)
    codes = np.array(mx.dequantize(q, mx.ones_like(scales), mx.zeros_like(biases), 32, 3)).astype(np.uint8).ravel()
    np.testing.assert_array_equal(transforms.code_values(np.array(q).tobytes(), 3), codes)
    pairs = np.frombuffer(transforms.forward("codes:3", np.array(q).tobytes()), np.uint8)
    np.testing.assert_array_equal(pairs & 7, codes[0::2])
    np.testing.assert_array_equal(pairs >> 3, codes[1::2])


@pytest.mark.parametrize("name", ["none", "zstd-1", "zstd-19", "lz4", "lz4hc-9", "zlib-6", "lzma-6"])
def test_codecs_round_trip_and_reject_damage(name):
    coder = codecs.codec(name)
    data = np.random.default_rng(0).integers(0, 16, 50_000, dtype=np.uint8).tobytes()
    stored = coder.compress(data)
    assert coder.decompress(stored, len(data)) == data
    with pytest.raises(codecs.CorruptData):
        coder.decompress(stored[: len(stored) // 2], len(data))


def test_pack_and_unpack_reproduce_the_folder_byte_for_byte(workdir):
    root, _ = workdir
    done = run_cli("pack", str(root / "mixed"), "--out", str(root / "rt.lsaqpack"), "--json")
    assert done.returncode == 0, done.stderr
    done = run_cli("unpack", str(root / "rt.lsaqpack"), "--out", str(root / "rt-out"), "--json")
    assert done.returncode == 0, done.stderr
    assert file_hashes(root / "rt-out") == file_hashes(root / "mixed")
    with ContainerReader(root / "rt.lsaqpack") as reader:
        transforms_used = {r["transform"] for r in reader.records.values()}
    assert {"codes:2", "codes:3", "codes:5", "codes:6", "codes:8", "shuffle:2"} <= transforms_used
    again = run_cli("unpack", str(root / "rt.lsaqpack"), "--out", str(root / "rt-out"))
    assert_one_line_error(again, "already exists")
    assert run_cli("unpack", str(root / "rt.lsaqpack"), "--out", str(root / "rt-out"), "--force").returncode == 0
    assert_one_line_error(run_cli("pack", str(root / "mixed"), "--out", str(root / "rt.lsaqpack")), "already exists")
    assert_one_line_error(run_cli("pack", str(root / "nowhere")), "not found")


def test_a_pack_loads_as_the_folder_does(workdir):
    root, _ = workdir
    pack_model(root / "mixed", root / "load.lsaqpack")
    folder, packed = resolve_model(str(root / "mixed")), resolve_model(str(root / "load.lsaqpack"))
    assert packed.kind == "pack" and packed.fingerprint == folder.fingerprint
    assert not list(packed.path.glob("*.safetensors"))  # the weights stay in the pack
    np.testing.assert_array_equal(logits(packed), logits(folder))
    # the CLI takes it wherever it takes a model
    done = run_cli("generate", "-m", str(root / "load.lsaqpack"), "-p", "hello", "-n", "3", "--json")
    assert done.returncode == 0, done.stderr


def damaged_copies(pack: Path, tmp: Path) -> dict:
    """Copies of ``pack`` truncated or with one byte flipped in a tensor or the index."""
    data = pack.read_bytes()
    with ContainerReader(pack) as reader:
        record = next(r for r in reader.records.values() if r["transform"].startswith("codes"))
        offset, stored, _ = record["chunks"][0]
        index_at = int.from_bytes(data[-56:-48], "little")
    copies = {
        "truncated by half": data[: len(data) // 2],
        "truncated by one byte": data[:-1],
        "only a header": data[:12],
        "flipped tensor byte": data[: offset + stored // 2] + bytes([data[offset + stored // 2] ^ 0x40]) + data[offset + stored // 2 + 1 :],
        "flipped index byte": data[: index_at + 10] + bytes([data[index_at + 10] ^ 1]) + data[index_at + 11 :],
    }
    paths = {}
    for label, content in copies.items():
        paths[label] = tmp / f"{label.replace(' ', '-')}.lsaqpack"
        paths[label].write_bytes(content)
    return paths


def test_damaged_packs_give_one_line_errors_never_a_model(workdir):
    root, _ = workdir
    pack_model(root / "mixed", root / "good.lsaqpack", force=True)
    (root / "damaged").mkdir(exist_ok=True)
    for label, path in damaged_copies(root / "good.lsaqpack", root / "damaged").items():
        out = root / "damaged" / f"{path.stem}-out"
        result = run_cli("unpack", str(path), "--out", str(out))
        assert_one_line_error(result, "truncated" if "truncated" in label or "header" in label else "corrupt")
        assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
        with pytest.raises(UserError):
            load_model(resolve_model(str(path)))
        result = run_cli("generate", "-m", str(path), "-p", "hi", "-n", "1")
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_flipped_byte_that_still_decompresses_fails_the_hash(workdir, tmp_path):
    root, _ = workdir
    pack_model(root / "mixed", tmp_path / "m.lsaqpack")
    data = bytearray((tmp_path / "m.lsaqpack").read_bytes())
    with ContainerReader(tmp_path / "m.lsaqpack") as reader:
        header = next(r for n, r in reader.records.items() if n.endswith("#header"))
    # a stored zstd frame with no checksum: flip bits in its literals until it decodes
    offset, stored, _ = header["chunks"][0]
    for at in range(offset + stored - 8, offset + 12, -1):
        data[at] ^= 0x01
        (tmp_path / "flip.lsaqpack").write_bytes(bytes(data))
        try:
            codecs.codec(header["codec"]).decompress(bytes(data[offset : offset + stored]), header["chunks"][0][2])
        except codecs.CorruptData:
            data[at] ^= 0x01
            continue
        break
    with pytest.raises(UserError, match="SHA-256"), ContainerReader(tmp_path / "flip.lsaqpack") as reader:
        reader.read(header["name"])


@pytest.fixture(scope="module")
def plans(workdir):
    _, source = workdir
    model, _, _ = load_model(source, compute=False)
    ctx = PlanningContext(model, source.fingerprint)
    return {b: plan_uniform(ctx, None, b, 32) for b in (3, 4, 8)} | {
        "mixed": Planner(source).plan(PlanRequest(method="uniform", bits=3, overrides=OVERRIDES))}


class NoSource:
    """Source weights that must not be read: the layer store serves every module."""

    folder = "nowhere"

    def get(self, name):
        raise AssertionError(f"read {name} from the source")


def swapped(source, start, target, weights, store=None):
    model, _ = quantized_model(source, start)
    prepare_for_compute(model)
    report = swap_modules(model, target.modules, weights, float32_compute=True, store=store)
    assert not report.failed, report.failed
    return dict(tree_flatten(model.parameters())), report


def test_layer_store_swaps_equal_requantizing(workdir, plans, tmp_path):
    _, source = workdir
    model, _ = quantized_model(source, plans[3])
    store = LayerStore(tmp_path / "store")
    built = store.build([plans[3], plans[8], plans["mixed"]], module_maker(model, SourceTensors(source.path)))
    assert built["written"] == built["modules"] > 0
    assert store.build([plans[8]], module_maker(model, SourceTensors(source.path)))["written"] == 0  # already there
    for target in (plans[8], plans["mixed"]):
        direct, requantizing = swapped(source, plans[3], target, SourceTensors(source.path))
        from_store, reading = swapped(source, plans[3], target, NoSource(), store)
        assert requantizing.source_bytes > 0 and requantizing.store_bytes == 0
        assert reading.store_bytes > 0 and reading.source_bytes == 0
        assert direct.keys() == from_store.keys()
        for name in direct:
            assert mx.array_equal(direct[name], from_store[name]).item() and direct[name].dtype == from_store[name].dtype, name
    assert store.bytes_read > 0
    # a setting the store lacks is quantized from the source
    assert store.module(next(iter(plans[4].modules)), next(iter(plans[4].modules.values()))) is None


def test_a_damaged_layer_store_falls_back_to_the_source(workdir, plans, tmp_path):
    _, source = workdir
    model, _ = quantized_model(source, plans[3])
    store = LayerStore(tmp_path / "store")
    store.build([plans[8]], module_maker(model, SourceTensors(source.path)))
    store.close()
    for f in (tmp_path / "store").iterdir():
        f.write_bytes(f.read_bytes()[:-100])
    damaged = LayerStore(tmp_path / "store")
    direct, _ = swapped(source, plans[3], plans[8], SourceTensors(source.path))
    fallback, report = swapped(source, plans[3], plans[8], SourceTensors(source.path), damaged)
    assert report.store_bytes == 0 and report.source_bytes > 0
    assert all(mx.array_equal(direct[k], fallback[k]).item() for k in direct)
    assert damaged.bytes_read == 0


def test_engine_swaps_from_the_layer_store_of_a_packed_source(workdir, plans, tmp_path):
    _, source = workdir
    pack_model(source.path, tmp_path / "source.lsaqpack")
    packed = resolve_model(str(tmp_path / "source.lsaqpack"))
    engine = Engine(packed, FixedPlans({3: plans[3], 8: plans[8]}),
                    RuntimeOptions(bits_budget=3, auto=True, budgets=(3, 8), layer_store=True)).start()
    try:
        engine.apply_budget(8)
        while not isinstance(event := engine.events.get(timeout=120), (Swapped, EngineError)):
            pass
        assert isinstance(event, Swapped) and event.changed == len(plans[8].modules) and not event.failed
        assert event.store_bytes_read == engine.control.store.bytes_read > 0 and event.source_bytes_read == 0
    finally:
        engine.shutdown()


def test_stacked_experts_round_trip_through_the_layer_store_and_a_mismatched_setting_is_refused(tmp_path):
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    from lsaq_mlx.planning.choices import Affine
    from lsaq_mlx.storage.layer_store import stored_module

    experts = QuantizedSwitchLinear(64, 16, 4, bias=False, group_size=32, bits=3)
    arrays = dict(tree_flatten(experts.parameters()))
    path, choice = "model.layers.0.mlp.switch_mlp.up_proj", Affine(3, 32)
    store = LayerStore(tmp_path / "store")
    modules = {(path, choice): ("QuantizedSwitchLinear", arrays)}
    store.add(modules)
    assert modules == {}  # the store took each module's arrays as it wrote them: the caller holds none of them
    read = LayerStore(tmp_path / "store").module(path, choice)
    assert isinstance(read, QuantizedSwitchLinear) and (read.bits, read.group_size) == (3, 32)
    assert all(mx.array_equal(read[k], v) for k, v in arrays.items())
    assert LayerStore(tmp_path / "store").module(path, Affine(4, 32)) is None
    info = {"class": "QuantizedSwitchLinear", "bits": 8, "group_size": 1 << 30, "mode": "affine"}
    with pytest.raises(UserError, match="not stored as"):
        stored_module(info, arrays, choice)  # sizes in the file are never used to build the module

"""Fuzzing the readers of every file lsaq-mlx takes from a user or a cache: GGUF, the
safetensors header, the pack container, and the cache's JSON entries.

Each example is a valid file mutated by truncation, byte flips, or a structural change
that keeps the file parseable (a JSON node replaced, removed or duplicated with lengths
and hashes fixed up; GGUF hyperparameters set to odd values). The property: the reader
returns a correct result or raises a ``UserError`` of one line; never another
exception, never a write outside the example's own temporary folder.

``LSAQ_MLX_FUZZ_EXAMPLES`` sets the examples per reader (default 20, a few seconds in
all; e.g. 2000 for a long run).
"""

import copy
import hashlib
import json
import os
import random
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from lsaq_mlx.cache import read_cache_json
from lsaq_mlx.errors import UserError
from lsaq_mlx.formats import safetensors_header
from lsaq_mlx.planning.pipeline import PipelinePlan
from lsaq_mlx.planning.plan import QuantPlan
from lsaq_mlx.scoring.scores import LayerScores
from lsaq_mlx.storage.container import END, TRAILER
from tiny_models import tiny_model, write_gguf

EXAMPLES = int(os.environ.get("LSAQ_MLX_FUZZ_EXAMPLES", "20"))
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="lsaq-hypothesis-"))  # not the checkout
# no database and no explain phase: hypothesis writes nothing into the checkout
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="LSAQ_MLX_FUZZ_EXAMPLES" not in os.environ,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ODD_VALUES = [None, True, False, -1, 0, 1, 2**31 - 1, 2**62, -2**62, 1.5, float("nan"), "", "../../x", "/etc/passwd",
              "a\x00b", "A" * 5000, [], {}, [[[[[]]]]], {"a": {"b": {"c": {}}}}, [1, 2, 3]]


@contextmanager
def contained():
    """A fresh folder to work in (cwd and cache inside it) beside a victim folder; on exit
    nothing may have been written outside the work folder."""
    root = Path(tempfile.mkdtemp(prefix="lsaq-fuzz-"))
    work, victim = root / "work", root / "victim"
    work.mkdir()
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    system_tmp = tempfile.gettempdir()
    outside = set(os.listdir(system_tmp))
    cwd, cache = os.getcwd(), os.environ.get("LSAQ_MLX_CACHE")
    os.chdir(work)
    os.environ["LSAQ_MLX_CACHE"] = str(work / "cache")
    tempfile.tempdir = str(work)  # what uses the system's temporary folder stays inside too
    try:
        yield work
    finally:
        tempfile.tempdir = None
        os.chdir(cwd)
        os.environ["LSAQ_MLX_CACHE"] = cache or ""
        if cache is None:
            os.environ.pop("LSAQ_MLX_CACHE")
        assert sorted(os.listdir(root)) == ["victim", "work"]
        assert [p.name for p in victim.iterdir()] == ["keep.txt"] and (victim / "keep.txt").read_text() == "mine"
        new = set(os.listdir(system_tmp)) - outside - {root.name}
        assert not [n for n in new if "lsaq" in n], new  # other processes may use the folder too
        import shutil

        shutil.rmtree(root)


def expect_result_or_user_error(action):
    """Run ``action``; return its result, or None after a one-line ``UserError``."""
    try:
        return action()
    except UserError as e:
        assert "\n" not in str(e).strip(), str(e)
        return None


# ---- mutations ----
def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def mutate_json(value, rng: random.Random):
    """``value`` with one node replaced by an odd value, deleted, or duplicated."""
    value = copy.deepcopy(value)
    nodes = []

    def walk(node, parent, key, depth):
        if parent is not None:
            nodes.append((parent, key))
        if isinstance(node, dict) and depth < 6:
            for k in list(node)[:50]:
                walk(node[k], node, k, depth + 1)
        elif isinstance(node, list) and depth < 6:
            for i in range(min(len(node), 50)):
                walk(node[i], node, i, depth + 1)

    walk(value, None, None, 0)
    if not nodes:
        return rng.choice(ODD_VALUES)
    parent, key = rng.choice(nodes)
    action = rng.choice(["replace", "replace", "delete", "duplicate"])
    if action == "replace":
        parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    else:
        parent[f"{key}"] = copy.deepcopy(rng.choice(list(parent.values())))
        parent[f"./{key}" if isinstance(key, str) else key] = copy.deepcopy(parent[key])
    return value


MUTATIONS = st.sampled_from(["truncate", "flip", "structure"])
SEEDS = st.integers(0, 2**32 - 1)


# ---- safetensors headers ----
@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    mx.save_safetensors(str(path), {"a.weight": mx.ones((4, 8)), "a.bias": mx.zeros((4,), mx.float16),
                                    "b.scales": mx.ones((2, 3), mx.bfloat16)}, metadata={"format": "mlx"})
    return path


def with_header(data: bytes, header) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    new = json.dumps(header).encode()
    return struct.pack("<Q", len(new)) + new + data[8 + n:]


@FUZZ
@given(kind=MUTATIONS, seed=SEEDS)
def test_safetensors_header_reader(safetensors_file, kind, seed):
    rng = random.Random(seed)
    data = safetensors_file.read_bytes()
    if kind == "structure":
        (n,) = struct.unpack("<Q", data[:8])
        data = with_header(data, mutate_json(json.loads(data[8:8 + n]), rng))
    else:
        data = truncate(data, rng) if kind == "truncate" else flip(data, rng)
    with contained() as work:
        path = work / "model.safetensors"
        path.write_bytes(data)
        header = expect_result_or_user_error(lambda: safetensors_header(path))
        if header is not None:  # what it accepts, MLX reads
            tensors = mx.load(str(path))
            assert set(tensors) == set(header) - {"__metadata__"}


# ---- GGUF ----
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(tiny_model("llama"), "llama", path)
    return path


HPARAMS = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
           "attention.head_count_kv", "context_length", "rope.freq_base", "attention.layer_norm_rms_epsilon"]
ODD_HPARAMS = [0, 1, 3, 7, 1000, 2**31 - 1, 2**32 - 1, 0.0, -1.0, 1e30, "x"]


@FUZZ
@given(kind=MUTATIONS, seed=SEEDS)
def test_gguf_import(gguf_file, kind, seed):
    from lsaq_mlx.sources.folder import check_model_folder
    from lsaq_mlx.sources.gguf_import import import_gguf

    rng = random.Random(seed)
    with contained() as work:
        path = work / "model.gguf"
        if kind == "structure":
            odd = {k: rng.choice(ODD_HPARAMS) for k in rng.sample(HPARAMS, rng.randint(1, 3))}
            write_gguf(tiny_model("llama"), "llama", path, hparams=odd)
        else:
            data = gguf_file.read_bytes()
            path.write_bytes(truncate(data, rng) if kind == "truncate" else flip(data, rng))
        out = work / "out"
        out.mkdir()
        if expect_result_or_user_error(lambda: import_gguf(path, out)) is not None:
            check_model_folder(out)  # what it writes, mlx-lm's checks accept


# ---- the pack container ----
@pytest.fixture(scope="module")
def pack_file(tiny_llama, tmp_path_factory) -> Path:
    from lsaq_mlx.storage.model_pack import pack_model

    path = tmp_path_factory.mktemp("pack") / "tiny.lsaqpack"
    pack_model(tiny_llama.path, path)
    return path


def with_index(data: bytes, index) -> bytes:
    offset, _, _, _ = TRAILER.unpack(data[-TRAILER.size:])
    new = json.dumps(index).encode()
    return data[:offset] + new + TRAILER.pack(offset, len(new), hashlib.sha256(new).digest(), END)


@FUZZ
@given(kind=MUTATIONS, seed=SEEDS)
def test_pack_reader(pack_file, kind, seed):
    from lsaq_mlx.storage.model_pack import PackedModel, unpack_model

    rng = random.Random(seed)
    data = pack_file.read_bytes()
    if kind == "structure":
        offset, length, _, _ = TRAILER.unpack(data[-TRAILER.size:])
        data = with_index(data, mutate_json(json.loads(data[offset:offset + length]), rng))
    else:
        data = truncate(data, rng) if kind == "truncate" else flip(data, rng)
    with contained() as work:
        path = work / "model.lsaqpack"
        path.write_bytes(data)

        def read(step):
            packed = PackedModel(path)
            try:
                return step(packed)
            finally:
                packed.close()

        names = expect_result_or_user_error(lambda: read(lambda p: set(p.files)))
        expect_result_or_user_error(lambda: read(lambda p: p.content_fingerprint()))
        expect_result_or_user_error(lambda: read(lambda p: p.weights()))
        report = expect_result_or_user_error(lambda: unpack_model(path, work / "out"))
        if report is not None:  # exactly the files the pack lists, each checked
            written = {p.relative_to(work / "out").as_posix() for p in (work / "out").rglob("*") if p.is_file()}
            assert written - {".lsaq-mlx"} == names


# ---- the cache's JSON entries ----
SCORES = {"model_fingerprint": "0123456789abcdef", "metric": "jaccard", "params": {"tokens": 512},
          "scores": [0.1, 0.5, 0.2], "wall_seconds": 1.0, "backend": {}, "model": "default", "version": 1}
PLAN = {"type": "QuantPlan", "model_fingerprint": "0123456789abcdef", "method": "lsaq",
        "budget": {"bits_per_weight": 4.0},
        "modules": {"model.layers.0.mlp.up_proj": {"bits": 4, "group_size": 64, "mode": "affine"},
                    "lm_head": False},
        "predicted_bytes": 1000, "predicted_bits_per_weight": 4.0, "parameters": 2000, "scores": {}, "details": {},
        "version": 1}
PIPELINE = {"type": "PipelinePlan", "version": 1, "context": 1024, "details": {},
            "plan": PLAN | {"modules": PLAN["modules"] | {"model.layers.1.mlp.up_proj": False}},
            "ranks": [{"rank": 0, "memory_bytes": 10**9, "first_layer": 0, "end_layer": 1, "weight_bytes": 500,
                       "kv_bytes": 10, "reserve_bytes": 10, "parameters": 900},
                      {"rank": 1, "memory_bytes": 10**9, "first_layer": 1, "end_layer": 2, "weight_bytes": 500,
                       "kv_bytes": 10, "reserve_bytes": 10, "parameters": 1100}],
            "rank_plans": []}
TABLE = {"model.layers.0.mlp.up_proj": {"4/64": 0.5, "8/64": 0.25, "keep": 0.0},
         "lm_head": {"4/64": 1.0, "8/64": 0.5, "keep": 0.0}}


def serialised(value, kind: str, rng: random.Random) -> bytes:
    data = json.dumps(mutate_json(value, rng) if kind == "structure" else value).encode()
    return data if kind == "structure" else truncate(data, rng) if kind == "truncate" else flip(data, rng)


@FUZZ
@given(kind=MUTATIONS, seed=SEEDS)
def test_cache_json_readers(kind, seed):
    from lsaq_mlx.planning.cost_table import _check
    from lsaq_mlx.sweep.results import read_results

    rng = random.Random(seed)
    with contained() as work:
        scores, plan, table, results = (work / n for n in ("scores.json", "plan.json", "table.json", "results.jsonl"))
        scores.write_bytes(serialised(SCORES, kind, rng))
        plan.write_bytes(serialised(PLAN, kind, rng))
        table.write_bytes(serialised(TABLE, kind, rng))
        results.write_bytes(b"\n".join(serialised({"key": "k", "status": "ok", "eval": {}}, kind, rng)
                                       for _ in range(3)))
        got = read_cache_json(scores, "scores", lambda d: LayerScores.from_dict(d, str(scores)))
        assert got is None or isinstance(got, LayerScores) and all(isinstance(x, float) for x in got.scores)
        loaded = expect_result_or_user_error(lambda: QuantPlan.load(plan))
        assert loaded is None or isinstance(loaded.modules, dict)
        pipeline = work / "pipeline.json"
        pipeline.write_bytes(serialised(PIPELINE, kind, rng))
        split = expect_result_or_user_error(lambda: PipelinePlan.load(pipeline))
        assert split is None or (split.ranks[0].first_layer == 0 and split.context >= 1
                                 and all(a.end_layer == b.first_layer for a, b in zip(split.ranks, split.ranks[1:])))
        keys = {p: set(v) for p, v in TABLE.items()}
        got = read_cache_json(table, "cost table", lambda d: _check(d, keys))
        assert got is None or set(got) == set(TABLE)
        rows, malformed = read_results(results)
        assert all(isinstance(r, dict) for r in rows.values()) and malformed >= 0

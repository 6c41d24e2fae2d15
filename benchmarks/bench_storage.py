"""Storage benchmark: how far quantized weights compress, what a pack costs or saves at
load time, and what the layer store saves on a hot swap, in one run.

    python benchmarks/bench_storage.py [--model default] [--work DIR] [--sample-mb 8] [--repeats 3] [--json F]
                                    [--parts compress,packs,load,swap]

1. The default model (its float32 import) converted at a few budgets (uniform 3 and 4
   bits, group 64; lsaq at 4.0 bits per weight, a mixed plan), each written by
   ``convert``;
2. compressibility per tensor kind (codes per bit width, float16 scales, biases, other
   float16, float32): ratio, compression and decompression MB/s (of raw bytes, the
   inverse transform included) for each transform x codec, on up to --sample-mb of each
   kind (whole tensors spread over the layers); zstd dictionaries for small records;
3. per model: the files' size, zstd-3 on the files as they are, the pack, pack and
   unpack time, and a byte-for-byte check of the unpacked folder;
4. load time of each model from its folder (mlx_lm.load) and from its pack, warm and cold
   page cache, each load in a fresh process (median of --repeats); cold = the kernel's
   page cache dropped (``echo 3 > /proc/sys/vm/drop_caches``, needs root) right before
   the load, after the imports;
5. a full hot swap between lsaq plans of --low and --high bits per weight, re-quantizing
   from the float source vs reading the layer store, warm and cold, in both compute
   modes (dequantized float32 as on the CPU backend, quantized as on Apple silicon):
   seconds (median of --repeats), bytes read (logical, and from the device per /proc/self/io), and a check
   that both give identical weights.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CODECS = ["zstd-1", "zstd-3", "zstd-19", "lz4", "lzma-6"]
DROP_CACHES = "/proc/sys/vm/drop_caches"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--work", type=Path, help="Folder for the converted models and packs (default: a temporary one).")
    parser.add_argument("--sample-mb", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--low", type=float, default=3.0)
    parser.add_argument("--high", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="Also write every measurement here.")
    parser.add_argument("--parts", default="compress,packs,load,swap", help="Which measurements to make.")
    parser.add_argument("--load-child", nargs=3, help=argparse.SUPPRESS)  # spec, cold|warm, result file
    args = parser.parse_args()
    from lsaq_mlx.backend.blas import reexec_with_fast_blas

    reexec_with_fast_blas()
    if args.load_child:
        return load_child(*args.load_child)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "can_drop_caches": can_drop_caches()}
    from lsaq_mlx.sources import resolve_model

    parts = set(args.parts.split(","))
    source = resolve_model(args.model)
    models = convert_models(source, work)
    if "compress" in parts:
        results["compressibility"] = compressibility([source.path] + list(models.values()), args.sample_mb)
        results["dictionaries"] = dictionaries(models["lsaq 4.0 bpw"])
        results["code_entropy"] = code_entropy([source.path] + list(models.values()))
    if parts & {"packs", "load"}:
        results["models"] = {name: pack_and_check(folder, work) for name, folder in
                             [("source (float32)", source.path)] + list(models.items())}
    if "load" in parts:
        results["load"] = {name: load_times(folder, work / f"{Path(folder).name}.lsaqpack", args.repeats,
                                            results["can_drop_caches"]) for name, folder in models.items()}
    if "swap" in parts:
        results["swap"] = swap_latency(source, args.low, args.high, results["can_drop_caches"], args.repeats)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def machine() -> dict:
    import mlx.core as mx

    from lsaq_mlx.backend.compute import describe

    return {"platform": f"{platform.system()} {platform.machine()}", "cpus": os.cpu_count(), "mlx": mx.__version__,
            "backend": describe()["backend"], "blas": describe()["blas"]}


def can_drop_caches() -> bool:
    try:
        drop_caches()
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def convert_models(source, work: Path) -> dict:
    from lsaq_mlx.convert import convert
    from lsaq_mlx.planning.planner import Planner, PlanRequest

    planner = Planner(source)
    requests = {"uniform 3-bit": PlanRequest(method="uniform", bits=3, group_size=64),
                "uniform 4-bit": PlanRequest(method="uniform", bits=4, group_size=64),
                "lsaq 4.0 bpw": PlanRequest(method="lsaq", bits_budgets=[4.0])}
    models = {}
    for name, request in requests.items():
        folder = work / name.replace(" ", "-")
        if not (folder / "lsaq_report.json").is_file():
            log(f"converting {name}")
            convert(source, planner.plan(request), folder, force=True, float_model=planner.model_in_memory())
        models[name] = folder
    return models


def safetensors_tensors(folder: Path):
    """(name, dtype, raw bytes, bits of its codes or None) of every tensor of a folder."""
    from lsaq_mlx.formats import safetensors_header
    from lsaq_mlx.storage.model_pack import code_bits

    config = json.loads((Path(folder) / "config.json").read_text())
    for file in sorted(Path(folder).glob("*.safetensors")):
        header = safetensors_header(file)
        bits = code_bits(config, header)
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                f.seek(8 + n + begin)
                yield name, info["dtype"], f.read(end - begin), bits.get(name)


def tensor_kind(name: str, dtype: str, bits) -> str:
    if bits is not None:
        return f"codes {bits}-bit"
    if name.endswith((".scales", ".biases")):
        return f"{name.rsplit('.', 1)[1]} (float16)"
    return {"F16": "other float16", "F32": "float32 (source)", "BF16": "other bfloat16"}.get(dtype, dtype)


def candidates(kind: str) -> list[str]:
    if kind.startswith("codes"):
        bits = int(kind.split()[1].split("-")[0])
        return ["none", "shuffle:4", f"codes:{bits}", f"bitplanes:{bits}"]
    if kind.startswith("float32"):
        return ["none", "shuffle:4"]
    return ["none", "shuffle:2", "delta:2"]


def compressibility(folders: list[Path], sample_mb: float) -> list[dict]:
    """Every transform x codec on a sample of every tensor kind of ``folders``."""
    from lsaq_mlx.storage import transforms
    from lsaq_mlx.storage.codecs import codec
    from lsaq_mlx.storage.container import chunks_of
    from lsaq_mlx.storage.model_pack import encoding_for

    by_kind: dict[str, list[bytes]] = {}
    chosen: dict[str, tuple] = {}
    for folder in folders:
        for name, dtype, raw, bits in safetensors_tensors(folder):
            kind = tensor_kind(name, dtype, bits)
            by_kind.setdefault(kind, []).append(raw)
            chosen[kind] = encoding_for(dtype, bits)
    rows = []
    for kind in sorted(by_kind):
        sample = spread_sample(by_kind[kind], int(sample_mb * 1e6))
        total = sum(map(len, by_kind[kind]))
        log(f"compressibility: {kind} ({len(sample) / 1e6:.1f} MB of {total / 1e6:.1f} MB)")
        for transform in candidates(kind):
            unit = transforms.unit_bytes(transform)
            pieces = list(chunks_of(sample, unit))
            for name in CODECS:
                coder = codec(name)
                start = time.perf_counter()
                stored = [coder.compress(transforms.forward(transform, p)) for p in pieces]
                compress_s = time.perf_counter() - start
                sizes = [len(transforms.forward(transform, p)) for p in pieces]
                start = time.perf_counter()
                back = [transforms.inverse(transform, coder.decompress(s, n)) for s, n in zip(stored, sizes)]
                decompress_s = time.perf_counter() - start
                assert b"".join(back) == sample, (kind, transform, name)
                rows.append({"kind": kind, "kind_mb": total / 1e6, "sample_mb": len(sample) / 1e6,
                             "transform": transform, "codec": name, "ratio": len(sample) / sum(map(len, stored)),
                             "compress_mb_s": len(sample) / 1e6 / compress_s,
                             "decompress_mb_s": len(sample) / 1e6 / decompress_s,
                             "chosen": (transform, name) == chosen[kind]})
    return rows


def spread_sample(pieces: list[bytes], limit: int) -> bytes:
    """Every k-th tensor up to about ``limit`` bytes; of a tensor larger than what is
    left, its start (a multiple of 840 bytes, which every transform's unit divides)."""
    total = sum(map(len, pieces))
    step = max(1, round(total / limit)) if total > limit else 1
    out, size = [], 0
    for piece in pieces[::step]:
        if size >= limit:
            break
        take = min(len(piece), (limit - size) // 840 * 840 or 840)
        out.append(piece[:take])
        size += take
    return b"".join(out)


def code_entropy(folders: list[Path]) -> dict:
    """Per bit width: the order-0 entropy of the code values (bits per code) over all the
    models' quantized weights, and the ratio a code-by-code coder could reach at best."""
    import numpy as np

    from lsaq_mlx.storage import transforms

    counts: dict[int, np.ndarray] = {}
    for folder in folders:
        for _, _, raw, bits in safetensors_tensors(folder):
            if bits is not None:
                values = transforms.code_values(raw, bits)
                counts[bits] = counts.get(bits, 0) + np.bincount(values, minlength=1 << bits)
    out = {}
    for bits, c in sorted(counts.items()):
        p = c[c > 0] / c.sum()
        entropy = float(-(p * np.log2(p)).sum())
        out[f"codes {bits}-bit"] = {"bits_per_code": entropy, "ceiling_ratio": bits / entropy}
    return out


def dictionaries(folder: Path) -> dict:
    """Scales and biases compressed one tensor at a time (as records are), zstd-3, with
    and without a dictionary trained on the first quarter of the layers."""
    import zstandard

    from lsaq_mlx.storage import transforms

    records = [(name, transforms.forward("shuffle:2", raw)) for name, dtype, raw, bits in safetensors_tensors(folder)
               if name.endswith((".scales", ".biases"))]
    layers = sorted({int(n.split(".")[2]) for n, _ in records if n.startswith("model.layers.")})
    train = [r for n, r in records if n.startswith("model.layers.") and int(n.split(".")[2]) < layers[len(layers) // 4]]
    test = [r for n, r in records if not (n.startswith("model.layers.") and int(n.split(".")[2]) < layers[len(layers) // 4])]
    trained = zstandard.train_dictionary(16384, train)
    plain = sum(len(zstandard.ZstdCompressor(level=3).compress(r)) for r in test)
    with_dict = sum(len(zstandard.ZstdCompressor(level=3, dict_data=trained).compress(r)) for r in test)
    raw = sum(map(len, test))
    return {"records": len(test), "mean_record_kb": raw / len(test) / 1e3, "ratio_plain": raw / plain,
            "ratio_dictionary": raw / (with_dict + len(trained.as_bytes()))}


def file_hashes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def pack_and_check(folder: Path, work: Path) -> dict:
    from lsaq_mlx.storage.codecs import codec
    from lsaq_mlx.storage.container import chunks_of
    from lsaq_mlx.storage.model_pack import pack_model, unpack_model

    log(f"packing {folder}")
    pack = work / f"{Path(folder).name}.lsaqpack"
    report = pack_model(folder, pack, force=True)
    out = work / f"{Path(folder).name}.unpacked"
    start = time.perf_counter()
    unpack_model(pack, out, force=True)
    unpack_s = time.perf_counter() - start
    identical = file_hashes(out) == file_hashes(folder)
    zstd3 = codec("zstd-3")
    plain = sum(len(zstd3.compress(c)) for f in Path(folder).rglob("*") if f.is_file()
                for c in chunks_of(f.read_bytes()))
    return {"raw_mb": report.raw_bytes / 1e6, "pack_mb": report.packed_bytes / 1e6, "ratio": report.ratio,
            "zstd3_files_ratio": report.raw_bytes / plain, "pack_s": report.seconds, "unpack_s": unpack_s,
            "unpack_mb_s": report.raw_bytes / 1e6 / unpack_s, "identical": identical}


def load_times(folder: Path, pack: Path, repeats: int, cold_ok: bool) -> dict:
    times = {}
    for label, spec in (("folder", folder), ("pack", pack)):
        for cache in ("warm", "cold") if cold_ok else ("warm",):
            runs = []
            for _ in range(repeats):
                with tempfile.NamedTemporaryFile(suffix=".json") as result:
                    subprocess.run([sys.executable, __file__, "--load-child", str(spec), cache, result.name],
                                   check=True, stdout=subprocess.DEVNULL)
                    runs.append(json.loads(Path(result.name).read_text()))
            times[f"{label} {cache}"] = {"seconds": statistics.median(r["seconds"] for r in runs),
                                        "device_read_mb": statistics.median(r["read_mb"] for r in runs),
                                        "logits": runs[0]["logits"]}
    times["same_logits"] = len({t["logits"] for k, t in times.items() if isinstance(t, dict)}) == 1
    return times


def load_child(spec: str, cache: str, result: str) -> None:
    """One load in this fresh process: imports and resolution first, then (cold) drop
    the page cache, then time ``load_model`` (warm: after one untimed load)."""
    import mlx.core as mx
    import mlx_lm.models.llama  # noqa: F401  (imported before the clock starts, as the model needs it)

    from lsaq_mlx.sources import load_model, resolve_model

    source = resolve_model(spec)
    if cache == "warm":
        load_model(source, compute=False)
    else:
        drop_caches()
    before = read_bytes()
    start = time.perf_counter()
    model, _, _ = load_model(source, compute=False)
    seconds = time.perf_counter() - start
    read_mb = (read_bytes() - before) / 1e6
    logits = model(mx.array([[1, 2, 3, 4]]))
    digest = hashlib.sha256(bytes(memoryview(logits.astype(mx.float32)))).hexdigest()
    Path(result).write_text(json.dumps({"seconds": seconds, "read_mb": read_mb, "logits": digest}))


def read_files(folders) -> None:
    """Read every file of ``folders`` once, so they are in the page cache."""
    for folder in folders:
        for f in Path(folder).rglob("*"):
            if f.is_file():
                with open(f, "rb") as handle:
                    while handle.read(1 << 24):
                        pass


def read_bytes() -> int:
    """Bytes this process has read from the storage device (not the page cache)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def swap_latency(source, low_bits: float, high_bits: float, cold_ok: bool, repeats: int) -> dict:
    import mlx.core as mx
    from common import params_digest

    from lsaq_mlx.backend.compute import prepare_for_compute
    from lsaq_mlx.convert import quantized_model
    from lsaq_mlx.planning.planner import Planner, PlanRequest
    from lsaq_mlx.runtime.swap import layer_groups, module_maker, swap_modules
    from lsaq_mlx.sources.tensors import source_tensors
    from lsaq_mlx.storage.layer_store import LayerStore

    low, high = Planner(source).plans(PlanRequest(method="lsaq", bits_budgets=[low_bits, high_bits]))
    store_root = Path(tempfile.mkdtemp(prefix="layer-store-"))
    store = LayerStore(store_root)
    model, _ = quantized_model(source, low)
    log("building the layer store")
    built = store.build([low, high], module_maker(model, source_tensors(source)))
    del model
    rows, outcome = [], {}

    def one_swap(float32, start_plan, changes, cache, label):
        model, _ = quantized_model(source, start_plan)
        if float32:
            prepare_for_compute(model, "float32")
        mx.eval(model.parameters())
        store.close()  # reopen its files, as a swap in a new session would
        weights = source_tensors(source)
        if cache == "cold":
            drop_caches()
        else:
            read_files([store_root, source.path])
        before, start = read_bytes(), time.perf_counter()
        report = swap_modules(model, changes, weights, float32, store if label == "layer store" else None)
        seconds = time.perf_counter() - start
        assert not report.failed, report.failed
        outcome.setdefault((float32, start_plan.predicted_bits_per_weight), set()).add(params_digest(model))
        del model
        mx.clear_cache()
        return {"seconds": seconds, "device_read_mb": (read_bytes() - before) / 1e6,
                "logical_read_mb": (report.store_bytes + report.source_bytes) / 1e6}

    for float32 in (True, False):
        for start_plan, target in ((low, high), (high, low)):
            changes = {p: c for p, c in target.modules.items() if start_plan.modules[p] != c}
            for cache in ("warm", "cold") if cold_ok else ("warm",):
                for label in ("re-quantize", "layer store"):
                    runs = [one_swap(float32, start_plan, changes, cache, label) for _ in range(repeats)]
                    rows.append({"compute": "float32" if float32 else "quantized",
                                 "swap": f"{start_plan.predicted_bits_per_weight:.1f} -> {target.predicted_bits_per_weight:.1f}",
                                 "cache": cache, "path": label, "modules": len(changes),
                                 "layers": len(layer_groups(changes)),
                                 **{k: statistics.median(r[k] for r in runs) for k in runs[0]}})
    store.close()
    shutil.rmtree(store_root)
    return {"store": built, "rows": rows, "identical": all(len(d) == 1 for d in outcome.values())}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_report(r: dict) -> None:
    m = r["machine"]
    print(f"# Storage benchmark ({m['platform']}, {m['cpus']} cores, MLX {m['mlx']} {m['backend']} backend, "
          f"BLAS {m['blas']})\n")
    if "compressibility" in r:
        print_compressibility(r["compressibility"], r["dictionaries"])
        print("Order-0 entropy of the code values (the best ratio a coder of one code at a time can reach): "
              + "; ".join(f"{k} {v['bits_per_code']:.2f} bits ({v['ceiling_ratio']:.3f}x)"
                          for k, v in r["code_entropy"].items()) + "\n")
    if "models" in r:
        print_packs(r["models"])
    if "load" in r:
        print_load(r["load"], r["models"], r["can_drop_caches"])
    if "swap" in r:
        print_swap(r["swap"])


def print_compressibility(rows: list[dict], d: dict) -> None:
    print("## Compressibility by tensor kind (ratio; compress / decompress MB/s of raw bytes; * = what pack uses)\n")
    print("| kind | MB in the models | transform | " + " | ".join(CODECS) + " |")
    print("|---|---|---|" + "---|" * len(CODECS))
    for kind in dict.fromkeys(x["kind"] for x in rows):
        for transform in dict.fromkeys(x["transform"] for x in rows if x["kind"] == kind):
            cells = [next(x for x in rows if x["kind"] == kind and x["transform"] == transform and x["codec"] == c)
                     for c in CODECS]
            text = [f"{'*' if c['chosen'] else ''}{c['ratio']:.3f} ({c['compress_mb_s']:.0f} / {c['decompress_mb_s']:.0f})"
                    for c in cells]
            print(f"| {kind} | {cells[0]['kind_mb']:.1f} | {transform} | " + " | ".join(text) + " |")
    print(f"\nScales and biases one tensor at a time ({d['records']} records of {d['mean_record_kb']:.1f} KB on "
          f"average), shuffle:2 + zstd-3: ratio {d['ratio_plain']:.3f} without a dictionary, "
          f"{d['ratio_dictionary']:.3f} with a 16 KB dictionary trained on the first quarter of the layers "
          "(its size counted).\n")


def print_packs(models: dict) -> None:
    print("## Packs\n")
    print("| model | files MB | zstd-3 on the files | pack MB | pack ratio | pack s | unpack s (MB/s) | unpacked = original |")
    print("|---|---|---|---|---|---|---|---|")
    for name, p in models.items():
        print(f"| {name} | {p['raw_mb']:.1f} | {p['zstd3_files_ratio']:.3f} | {p['pack_mb']:.1f} | {p['ratio']:.3f} | "
              f"{p['pack_s']:.2f} | {p['unpack_s']:.2f} ({p['unpack_mb_s']:.0f}) | {'yes' if p['identical'] else 'NO'} |")


def print_load(load: dict, models: dict, cold_ok: bool) -> None:
    print(f"\n## Load time (median, fresh process each; read = from the device; break-even: the storage read speed "
          "below which the pack's fewer bytes outweigh its decoding, from the warm times)"
          f"{'' if cold_ok else ' - page cache could not be dropped: warm only'}\n")
    print("| model | folder warm | pack warm | folder cold | pack cold | pack / folder cold | break-even read speed "
          "| same logits |")
    print("|---|---|---|---|---|---|---|---|")
    for name, t in load.items():
        def cell(key, t=t):
            return f"{t[key]['seconds']:.2f} s ({t[key]['device_read_mb']:.0f} MB read)" if key in t else "n/a"
        ratio = f"{t['pack cold']['seconds'] / t['folder cold']['seconds']:.2f}x" if "pack cold" in t else "n/a"
        p = models[name]
        extra = t["pack warm"]["seconds"] - t["folder warm"]["seconds"]
        even = f"{(p['raw_mb'] - p['pack_mb']) / extra:.0f} MB/s" if extra > 0 else "always faster"
        print(f"| {name} | {cell('folder warm')} | {cell('pack warm')} | {cell('folder cold')} | {cell('pack cold')} | "
              f"{ratio} | {even} | {'yes' if t['same_logits'] else 'NO'} |")


def print_swap(s: dict) -> None:
    b = s["store"]
    print(f"\n## Hot swap: re-quantizing from the source vs the layer store\n\nLayer store for 2 plans: {b['modules']} "
          f"(module, setting) entries, {b['bytes'] / 1e6:.1f} MB on disk, built in {b['seconds']:.1f} s.\n")
    print("| compute | swap (bpw) | page cache | path | seconds | ms per layer | MB read (source: tensors; store: compressed) "
          "| MB read from the device |")
    print("|---|---|---|---|---|---|---|---|")
    for x in s["rows"]:
        print(f"| {x['compute']} | {x['swap']} | {x['cache']} | {x['path']} | {x['seconds']:.2f} | "
              f"{x['seconds'] / x['layers'] * 1000:.0f} | {x['logical_read_mb']:.1f} | {x['device_read_mb']:.1f} |")
    print(f"\nweights after the swap identical on both paths: {'yes' if s['identical'] else 'NO'}")

if __name__ == "__main__":
    main()

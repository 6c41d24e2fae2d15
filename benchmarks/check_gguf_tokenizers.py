"""Check the GGUF tokenizer rebuild against llama.cpp's own tokenizer test vectors.

llama.cpp ships vocabulary-only GGUFs with inputs and the ids its tokenizer produced
(``models/ggml-vocab-NAME.gguf`` + ``.gguf.inp`` + ``.gguf.out``; both in the llama.cpp
repository and in the ``llama-cpp-python`` sdist under ``vendor/llama.cpp``). For each
vocabulary this prints how many test strings our ``tokenizers`` rebuild encodes to
exactly the same ids (no BOS/EOS, special tokens not parsed, as in llama.cpp's test).

    python benchmarks/check_gguf_tokenizers.py /path/to/llama.cpp/models
"""

import sys
from pathlib import Path

from lsaq_mlx.errors import UserError
from lsaq_mlx.sources.gguf_file import gguf_metadata, open_gguf
from lsaq_mlx.sources.gguf_tokenizer import build_tokenizer

SEPARATOR = "\n__ggml_vocab_test__\n"


def read_cases(gguf: Path) -> list[tuple[str, list[int]]]:
    text = Path(f"{gguf}.inp").read_bytes().decode("utf-8", errors="surrogateescape")
    inputs = text.split(SEPARATOR)
    if inputs and inputs[-1].endswith("\n__ggml_vocab_test__"):
        inputs[-1] = inputs[-1][: -len("\n__ggml_vocab_test__")]
    outputs = Path(f"{gguf}.out").read_text().splitlines()
    inputs = inputs[: len(outputs)]
    return [(s, [int(t) for t in o.split()]) for s, o in zip(inputs, outputs)]


def check(gguf: Path) -> tuple[str, str]:
    meta = gguf_metadata(open_gguf(gguf))
    kind = f"{meta.get('tokenizer.ggml.model')}/{meta.get('tokenizer.ggml.pre', '-')}"
    try:
        tokenizer, _ = build_tokenizer(meta)
    except UserError as e:
        return kind, f"skipped: {e}"
    cases = read_cases(gguf)
    failures = []
    for text, expected in cases:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            continue  # invalid UTF-8 input: llama.cpp sees bytes Python strings cannot hold
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if got != expected:
            failures.append((text, expected, got))
    result = f"{len(cases) - len(failures)}/{len(cases)} identical"
    for text, expected, got in failures[:3]:
        result += f"\n    {text[:40]!r}: llama.cpp {expected[:12]} ours {got[:12]}"
    return kind, result


def main(models: Path) -> None:
    for gguf in sorted(models.glob("ggml-vocab-*.gguf")):
        if Path(f"{gguf}.inp").is_file():
            kind, result = check(gguf)
            print(f"{gguf.name:34s} {kind:22s} {result}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

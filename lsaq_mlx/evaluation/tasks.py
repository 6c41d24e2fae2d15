"""Zero-shot task files in their original formats, as multiple-choice items.

Prompts and choices follow lm-evaluation-harness's task definitions (lm_eval/tasks/*):
the context, then each choice after a single space, scored by log-likelihood.
Malformed rows are counted and skipped, never fatal.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from lsaq_mlx.errors import UserError

TASKS = ("piqa", "arc_easy", "arc_challenge", "openbookqa", "boolq", "winogrande", "hellaswag", "lambada")
TASK_FOLDERS = {t: "arc" if t.startswith("arc_") else t for t in TASKS}  # each task's folder under tasks/


@dataclass
class Item:
    contexts: list[str]  # one per choice (winogrande), else the same context repeated
    continuations: list[str]
    gold: int


@dataclass
class TaskData:
    name: str
    items: list[Item]
    skipped: int = 0  # malformed rows
    source: list[str] = field(default_factory=list)


def load_task(name: str, root: Path, limit: int | None = None) -> TaskData:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}' (one of {', '.join(TASKS)})")
    loader = {"arc_easy": _arc, "arc_challenge": _arc}.get(name) or globals()[f"_{name}"]
    files, rows = loader(name, Path(root))
    items, skipped = [], 0
    for row in rows:
        try:
            items.append(row())
        except (KeyError, ValueError, IndexError, TypeError, json.JSONDecodeError):
            skipped += 1
        if limit and len(items) >= limit:
            break
    return TaskData(name, items, skipped, [str(f) for f in files])


def _need(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"task file not found: {path} (the task folder must be laid out like ../shared/data/tasks)",
                        setting="data_dir")
    return path


def _jsonl(path: Path):
    for line in _need(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield line


def _same(context: str, choices: list[str], gold: int) -> Item:
    if not 0 <= gold < len(choices):
        raise ValueError("gold out of range")
    return Item([context] * len(choices), [" " + c for c in choices], gold)


def _piqa(name, root):
    data, labels = root / "piqa" / "valid.jsonl", _need(root / "piqa" / "valid-labels.lst")
    gold = labels.read_text().split()

    def row(line, label):
        d = json.loads(line)
        return _same(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(label))

    return [data, labels], [lambda l=line, g=g: row(l, g) for line, g in zip(_jsonl(data), gold)]


def _arc(name, root):
    part = "ARC-Easy" if name == "arc_easy" else "ARC-Challenge"
    data = root / "arc" / f"{part}-Test.jsonl"

    def row(line):
        d = json.loads(line)
        choices = d["question"]["choices"]
        labels = [c["label"] for c in choices]
        return _same(f"Question: {d['question']['stem']}\nAnswer:", [c["text"] for c in choices], labels.index(d["answerKey"]))

    return [data], [lambda l=line: row(l) for line in _jsonl(data)]


def _openbookqa(name, root):
    data = root / "openbookqa" / "test.jsonl"

    def row(line):
        d = json.loads(line)
        choices = d["question"]["choices"]
        labels = [c["label"] for c in choices]
        return _same(d["question"]["stem"], [c["text"] for c in choices], labels.index(d["answerKey"]))

    return [data], [lambda l=line: row(l) for line in _jsonl(data)]


def _boolq(name, root):
    data = root / "boolq" / "val.jsonl"

    def row(line):
        d = json.loads(line)
        label = d["label"]
        gold = int(label in (True, 1, "true", "True")) if label in (True, False, 0, 1, "true", "false", "True", "False") else None
        if gold is None:
            raise ValueError("bad label")
        return _same(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], gold)

    return [data], [lambda l=line: row(l) for line in _jsonl(data)]


def _winogrande(name, root):
    data, labels = root / "winogrande" / "dev.jsonl", _need(root / "winogrande" / "dev-labels.lst")
    gold = labels.read_text().split()

    def row(line, label):
        # the harness's partial evaluation: each option fills the blank; the text after
        # the blank is scored given each filled-in prefix
        d = json.loads(line)
        cut = d["sentence"].index("_")
        prefixes = [d["sentence"][:cut] + d[f"option{i}"] for i in (1, 2)]
        rest = " " + d["sentence"][cut + 1 :].strip()
        return Item(prefixes, [rest, rest], int(label) - 1)

    return [data, labels], [lambda l=line, g=g: row(l, g) for line, g in zip(_jsonl(data), gold)]


def _hellaswag(name, root):
    data = root / "hellaswag" / "hellaswag_val_full.txt"
    lines = _need(data).read_text(encoding="utf-8").splitlines()

    def row(i):
        block = lines[i : i + 6]
        return _same(block[0], block[2:6], int(block[1]))

    return [data], [lambda i=i: row(i) for i in range(0, len(lines) - 5, 6)]


def _lambada(name, root):
    """lambada_openai: the last word after a space, scored greedily (acc) and by likelihood."""
    data = root / "lambada" / "lambada_test.jsonl"

    def row(line):
        text = json.loads(line)["text"]
        context, word = text.rsplit(" ", 1)
        return Item([context], [" " + word], 0)

    return [data], [lambda l=line: row(l) for line in _jsonl(data)]

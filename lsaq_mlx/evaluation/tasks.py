"""Zero-shot task files in their original formats, as multiple-choice items.

Prompts and choices follow lm-evaluation-harness's task definitions (lm_eval/tasks/*):
the context, then each choice after a single space, scored by log-likelihood.
Malformed rows are counted and skipped, never fatal.
"""

from dataclasses import dataclass, field
from pathlib import Path

from lsaq_mlx.documents import parse_json, read_text
from lsaq_mlx.errors import UserError

TASKS = ("piqa", "arc_easy", "arc_challenge", "openbookqa", "boolq", "winogrande", "hellaswag", "lambada")
MAX_TASK_FILE_BYTES = 512 << 20  # HellaSwag's validation file is 11 MB
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
            items.append(_checked(row()))
        except (KeyError, ValueError, IndexError, TypeError, AttributeError, UserError):
            skipped += 1
        if limit is not None and len(items) >= limit:
            break
    return TaskData(name, items, skipped, [str(f) for f in files])


def _checked(item: Item) -> Item:
    """``item`` when it is texts and a gold index among its choices (the row had the right types)."""
    texts = [*item.contexts, *item.continuations]
    if not all(isinstance(t, str) for t in texts) or len(item.contexts) != len(item.continuations):
        raise TypeError("a context or choice is not text")
    if isinstance(item.gold, bool) or not isinstance(item.gold, int) or not 0 <= item.gold < len(item.continuations):
        raise ValueError("gold out of range")
    return item


def _need(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"task file not found: {path} (the task folder must be laid out like ../shared/data/tasks)",
                        setting="data_dir")
    return path


def _read(path: Path) -> str:
    return read_text(_need(path), f"task file {path}", MAX_TASK_FILE_BYTES)


def _jsonl(path: Path):
    for line in _read(path).splitlines():
        if line.strip():
            yield line


def _s(value) -> str:
    if not isinstance(value, str):
        raise TypeError("not text")
    return value


def _same(context: str, choices: list[str], gold: int) -> Item:
    return Item([context] * len(choices), [" " + c for c in choices], gold)


def _piqa(name, root):
    data, labels = root / "piqa" / "valid.jsonl", _need(root / "piqa" / "valid-labels.lst")
    gold = _read(labels).split()

    def row(line, label):
        d = parse_json(line, "a task row")
        return _same(f"Question: {_s(d['goal'])}\nAnswer:", [d["sol1"], d["sol2"]], int(label))

    return [data, labels], [lambda l=line, g=g: row(l, g) for line, g in zip(_jsonl(data), gold)]


def _arc(name, root):
    part = "ARC-Easy" if name == "arc_easy" else "ARC-Challenge"
    data = root / "arc" / f"{part}-Test.jsonl"

    def row(line):
        d = parse_json(line, "a task row")
        choices = d["question"]["choices"]
        labels = [c["label"] for c in choices]
        return _same(f"Question: {_s(d['question']['stem'])}\nAnswer:", [c["text"] for c in choices], labels.index(d["answerKey"]))

    return [data], [lambda l=line: row(l) for line in _jsonl(data)]


def _openbookqa(name, root):
    data = root / "openbookqa" / "test.jsonl"

    def row(line):
        d = parse_json(line, "a task row")
        choices = d["question"]["choices"]
        labels = [c["label"] for c in choices]
        return _same(_s(d["question"]["stem"]), [c["text"] for c in choices], labels.index(d["answerKey"]))

    return [data], [lambda l=line: row(l) for line in _jsonl(data)]


def _boolq(name, root):
    data = root / "boolq" / "val.jsonl"

    def row(line):
        d = parse_json(line, "a task row")
        label = d["label"]
        gold = int(label in (True, 1, "true", "True")) if label in (True, False, 0, 1, "true", "false", "True", "False") else None
        if gold is None:
            raise ValueError("bad label")
        return _same(f"{_s(d['passage'])}\nQuestion: {_s(d['question'])}?\nAnswer:", ["no", "yes"], gold)

    return [data], [lambda l=line: row(l) for line in _jsonl(data)]


def _winogrande(name, root):
    data, labels = root / "winogrande" / "dev.jsonl", _need(root / "winogrande" / "dev-labels.lst")
    gold = _read(labels).split()

    def row(line, label):
        # the harness's partial evaluation: each option fills the blank; the text after
        # the blank is scored given each filled-in prefix
        d = parse_json(line, "a task row")
        cut = _s(d["sentence"]).index("_")
        prefixes = [d["sentence"][:cut] + d[f"option{i}"] for i in (1, 2)]
        rest = " " + d["sentence"][cut + 1 :].strip()
        if label not in ("1", "2"):
            raise ValueError("a WinoGrande label is 1 or 2")
        return Item(prefixes, [rest, rest], int(label) - 1)

    return [data, labels], [lambda l=line, g=g: row(l, g) for line, g in zip(_jsonl(data), gold)]


def _hellaswag(name, root):
    data = root / "hellaswag" / "hellaswag_val_full.txt"
    lines = _read(data).splitlines()

    def row(i):
        block = lines[i : i + 6]
        return _same(block[0], block[2:6], int(block[1]))

    return [data], [lambda i=i: row(i) for i in range(0, len(lines) - 5, 6)]


def _lambada(name, root):
    """lambada_openai: the last word after a space, scored greedily (acc) and by likelihood."""
    data = root / "lambada" / "lambada_test.jsonl"

    def row(line):
        text = parse_json(line, "a task row")["text"]
        context, word = text.rsplit(" ", 1)
        return Item([context], [" " + word], 0)

    return [data], [lambda l=line: row(l) for line in _jsonl(data)]

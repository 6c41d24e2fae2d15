"""Evaluation data from the Hugging Face hub, fetched with ``datasets`` as mlx-lm does.

Each dataset is read once at the revision the hub names and written under
``<cache>/data`` in the layout of ``../shared/data`` (``wikitext-2-raw/wiki.test.raw``,
``tasks/<folder>/...`` in the tasks' original file formats), with a ``SOURCE.json``
naming the dataset and revision. The cache is then one more data folder: it works
offline, and the task readers validate its rows like any other file.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lsaq_mlx.cache import atomic_dir, cache_dir, file_sha256
from lsaq_mlx.errors import UserError
from lsaq_mlx.documents import read_json
from lsaq_mlx.settings import settings

WIKITEXT_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"  # the original wiki.test.raw


class HubUnavailable(UserError):
    """The hub cannot be reached, or ``datasets`` is not installed."""


@dataclass(frozen=True)
class HubDataset:
    repo: str
    config: str | None
    split: str

    def label(self, revision: str) -> str:
        return f"{self.repo}{'/' + self.config if self.config else ''} {self.split}@{revision[:12]}"


WIKITEXT = HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "test")


def hub_data_root() -> Path:
    return cache_dir() / "data"


def fetch_rows(dataset: HubDataset) -> tuple[list[dict], str]:
    """The split's rows and the commit of the dataset they came from."""
    if settings().hub_offline:
        raise HubUnavailable("HF_HUB_OFFLINE is set")
    try:
        import datasets
        from huggingface_hub import HfApi
    except ImportError:
        raise HubUnavailable("the `datasets` package is not installed (pip install datasets)") from None
    try:
        revision = HfApi().dataset_info(dataset.repo).sha
        rows = datasets.load_dataset(dataset.repo, dataset.config, split=dataset.split, revision=revision)
        return [dict(r) for r in rows], str(revision)
    except Exception as e:  # network, hub and dataset errors come in many types; all mean "not from the hub"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise HubUnavailable(f"{dataset.repo} could not be downloaded: {reason}") from None


def fetch_wikitext() -> Path:
    """WikiText-2 raw test as the original ``wiki.test.raw`` (blank rows are written as " ")."""
    rows, revision = fetch_rows(WIKITEXT)
    lines = [_text(row, "text") for row in rows]
    target = hub_data_root() / "wikitext-2-raw"
    with atomic_dir(target, force=True) as tmp:
        (tmp / "wiki.test.raw").write_bytes("".join(line or " \n" for line in lines).encode("utf-8"))
        digest = file_sha256(tmp / "wiki.test.raw")
        _write_source(tmp, [WIKITEXT.label(revision)], original_file=digest == WIKITEXT_SHA256)
    return target / "wiki.test.raw"


def source_label(folder: Path, file: str) -> str | None:
    """The dataset and revision a hub-fetched folder's ``file`` came from, or None. The
    folder's ``SOURCE.json`` says so; unless it also holds ``file``'s SHA-256 and the file
    still has it, the label says that it is a claim."""
    try:
        data = read_json(folder / "SOURCE.json", max_bytes=1 << 20)
        datasets = data["datasets"]
        if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
            return None
        label = ", ".join(d[:200] for d in datasets[:8])
        files = data.get("files")
        expected = files.get(file) if isinstance(files, dict) else None
    except (UserError, KeyError, TypeError, AttributeError):
        return None
    verified = isinstance(expected, str) and (folder / file).is_file() and file_sha256(folder / file) == expected
    return label if verified else f"{label} (as its SOURCE.json claims; the file does not match a hash there)"


# ---- zero-shot tasks: hub rows -> the original file formats that tasks.py reads ----

def _text(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} is not text")
    return value


def _choices(row: dict) -> list[dict]:
    texts, labels = row["choices"]["text"], row["choices"]["label"]
    if len(texts) != len(labels):
        raise ValueError("choices and labels differ in number")
    return [{"text": str(t), "label": str(l)} for t, l in zip(texts, labels)]


def _arc_line(row: dict, stem_key: str = "question") -> str:
    question = {"stem": _text(row, stem_key), "choices": _choices(row)}
    return json.dumps({"id": str(row.get("id", "")), "question": question, "answerKey": _text(row, "answerKey")})


def _hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's preprocessing of HellaSwag text (one line)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text).replace("  ", " ")
    return " ".join(text.splitlines())


def _hellaswag_item(row: dict) -> str:
    context = _text(row, "ctx_a") + " " + _text(row, "ctx_b").capitalize()
    endings = [_hellaswag_text(str(e)) for e in row["endings"]]
    if len(endings) != 4:
        raise ValueError("HellaSwag items have 4 endings")
    label = int(row["label"])
    return "\n".join([_hellaswag_text(_text(row, "activity_label") + ": " + context), str(label), *endings]) + "\n"


@dataclass(frozen=True)
class HubTask:
    """A task folder's files, each a list of (dataset, file name, row -> line)."""

    folder: str
    files: tuple


HUB_TASKS = {
    "piqa": HubTask("piqa", (
        (HubDataset("baber/piqa", None, "validation"), "valid.jsonl",
         lambda r: json.dumps({"goal": _text(r, "goal"), "sol1": _text(r, "sol1"), "sol2": _text(r, "sol2")}),
         "valid-labels.lst", lambda r: str(int(r["label"]))),)),
    "arc": HubTask("arc", (
        (HubDataset("allenai/ai2_arc", "ARC-Easy", "test"), "ARC-Easy-Test.jsonl", _arc_line),
        (HubDataset("allenai/ai2_arc", "ARC-Challenge", "test"), "ARC-Challenge-Test.jsonl", _arc_line))),
    "openbookqa": HubTask("openbookqa", (
        (HubDataset("allenai/openbookqa", "main", "test"), "test.jsonl", lambda r: _arc_line(r, "question_stem")),)),
    "boolq": HubTask("boolq", (
        (HubDataset("aps/super_glue", "boolq", "validation"), "val.jsonl",
         lambda r: json.dumps({"question": _text(r, "question"), "passage": _text(r, "passage"),
                               "label": int(r["label"])})),)),
    "winogrande": HubTask("winogrande", (
        (HubDataset("allenai/winogrande", "winogrande_xl", "validation"), "dev.jsonl",
         lambda r: json.dumps({"sentence": _text(r, "sentence"), "option1": _text(r, "option1"),
                               "option2": _text(r, "option2")}),
         "dev-labels.lst", lambda r: str(int(r["answer"]))),)),
    "hellaswag": HubTask("hellaswag", (
        (HubDataset("Rowan/hellaswag", None, "validation"), "hellaswag_val_full.txt", _hellaswag_item),)),
    "lambada": HubTask("lambada", (
        (HubDataset("EleutherAI/lambada_openai", "default", "test"), "lambada_test.jsonl",
         lambda r: json.dumps({"text": _text(r, "text")})),)),
}


def fetch_task_folder(folder: str) -> Path:
    """Download a task folder's datasets into ``<cache>/data/tasks/<folder>``.

    Rows that do not convert are left out of every file of their dataset together, so
    data and label files stay aligned."""
    task, labels = HUB_TASKS[folder], []
    target = hub_data_root() / "tasks" / folder
    with atomic_dir(target, force=True) as tmp:
        for dataset, *writers in task.files:
            rows, revision = fetch_rows(dataset)
            labels.append(dataset.label(revision))
            outputs = [[] for _ in writers[::2]]
            for row in rows:
                try:
                    lines = [line(row) for line in writers[1::2]]
                except (KeyError, ValueError, TypeError, IndexError):
                    continue
                for out, line in zip(outputs, lines):
                    out.append(line.rstrip("\n") + "\n")
            for name, out in zip(writers[::2], outputs):
                (tmp / name).write_bytes("".join(out).encode("utf-8"))
        _write_source(tmp, labels)
    return target


def _write_source(folder: Path, datasets: list[str], **extra) -> None:
    """``SOURCE.json``: where the folder's files came from, and their SHA-256 so a reader
    can tell the claim still holds for the files beside it."""
    files = {f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != "SOURCE.json"}
    (folder / "SOURCE.json").write_text(json.dumps({"datasets": datasets, "files": files, **extra}, indent=1) + "\n")

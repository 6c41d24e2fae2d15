"""Evaluation data from the hub: a fake ``datasets`` stands in for the network."""

import json
import sys
import types
from pathlib import Path

import pytest

from cli_run import assert_one_line_error, run_cli
from lsaq_mlx.errors import UserError
from lsaq_mlx.evaluation import data_sources, hub
from lsaq_mlx.evaluation.tasks import load_task

SHARED_WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(monkeypatch, empty_cache):
    """Serve ``rows[(repo, config, split)]`` as ``datasets.load_dataset`` would; count downloads."""
    import huggingface_hub

    rows, calls = {}, []

    def load_dataset(repo, config=None, split=None, revision=None):
        calls.append((repo, config, split, revision))
        if (repo, config, split) not in rows:
            raise ConnectionError(f"no route to {repo}\nsecond line")
        return rows[(repo, config, split)]

    class Api:
        def dataset_info(self, repo):
            return types.SimpleNamespace(sha=REVISION)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data_sources, "data_roots", lambda: [r for r in [hub.hub_data_root()] if r.is_dir()])
    return types.SimpleNamespace(rows=rows, calls=calls)


def test_wikitext_from_the_hub_is_the_original_file_and_is_cached(fake_hub):
    raw = SHARED_WIKITEXT.read_text(encoding="utf-8") if SHARED_WIKITEXT.is_file() else " \n = T = \n \n Text .\n"
    # the hub's rows: one per line, blank lines as ""
    fake_hub.rows[("Salesforce/wikitext", "wikitext-2-raw-v1", "test")] = [
        {"text": "" if line == " " else line + "\n"} for line in raw.splitlines()]
    name, text = data_sources.read_ppl_text("wikitext2")
    assert text == raw and "Salesforce/wikitext/wikitext-2-raw-v1 test@0123456789ab" in name
    source = json.loads((hub.hub_data_root() / "wikitext-2-raw" / "SOURCE.json").read_text())
    assert source["original_file"] == SHARED_WIKITEXT.is_file()
    assert data_sources.read_ppl_text("auto") == (name, text) and len(fake_hub.calls) == 1  # offline from now on


def test_tasks_from_the_hub_convert_to_the_original_formats(fake_hub):
    choices = {"text": ["red", "blue", "green"], "label": ["A", "B", "C"]}
    fake_hub.rows[("allenai/ai2_arc", "ARC-Easy", "test")] = [
        {"id": "1", "question": "Sky?", "choices": choices, "answerKey": "B"},
        {"id": "2", "question": "Broken", "choices": {"text": ["x"], "label": []}, "answerKey": "A"}]
    fake_hub.rows[("allenai/ai2_arc", "ARC-Challenge", "test")] = [
        {"id": "3", "question": "Grass?", "choices": choices, "answerKey": "C"}]
    fake_hub.rows[("allenai/winogrande", "winogrande_xl", "validation")] = [
        {"sentence": "The cup beat _ .", "option1": "a", "option2": "b", "answer": "2"},
        {"sentence": "bad", "option1": 3, "option2": "b", "answer": "1"},  # dropped from both files
        {"sentence": "I like _ a lot.", "option1": "tea", "option2": "rain", "answer": "1"}]
    fake_hub.rows[("Rowan/hellaswag", None, "validation")] = [
        {"activity_label": "Cooking", "ctx_a": "A man [header] cuts", "ctx_b": "onions.",
         "endings": ["he cries.", "he  flies.", "he sings.", "he runs."], "label": "0"}]

    root = data_sources.task_root("arc_easy")
    easy = load_task("arc_easy", root)
    assert [(i.continuations, i.gold) for i in easy.items] == [([" red", " blue", " green"], 1)]
    assert load_task("arc_challenge", data_sources.task_root("arc_challenge")).items[0].gold == 2
    wino = load_task("winogrande", data_sources.task_root("winogrande"))
    assert [(i.contexts[0], i.gold) for i in wino.items] == [("The cup beat a", 1), ("I like tea", 0)]
    swag = load_task("hellaswag", data_sources.task_root("hellaswag")).items[0]
    assert swag.contexts[0] == "Cooking: A man cuts Onions." and swag.continuations[1] == " he flies."
    label = hub.source_label(root / "arc", "ARC-Challenge-Test.jsonl")
    assert "allenai/ai2_arc/ARC-Challenge test@0123456789ab" in label and "claims" not in label
    assert len(fake_hub.calls) == 4  # the ARC folder was fetched once, for both parts


def test_a_source_claim_is_shown_as_a_claim_unless_its_hash_holds(tmp_path):
    (tmp_path / "wiki.test.raw").write_text("some text\n")
    (tmp_path / "SOURCE.json").write_text('{"datasets": ["Salesforce/wikitext@abc"]}')  # no hashes
    assert hub.source_label(tmp_path, "wiki.test.raw").endswith("(as its SOURCE.json claims; the file does not match a hash there)")
    hub._write_source(tmp_path, ["Salesforce/wikitext@abc"])
    assert hub.source_label(tmp_path, "wiki.test.raw") == "Salesforce/wikitext@abc"
    (tmp_path / "wiki.test.raw").write_text("other text\n")  # edited after the download
    assert "claims" in hub.source_label(tmp_path, "wiki.test.raw")
    (tmp_path / "SOURCE.json").write_text('{"datasets": ' + "[" * 1000 + "]" * 1000 + "}")
    assert hub.source_label(tmp_path, "wiki.test.raw") is None


def test_offline_auto_uses_the_packaged_text_and_named_data_fails_in_one_line(fake_hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data_sources.read_ppl_text("auto")[0] == data_sources.PACKAGED_NAME
    with pytest.raises(UserError, match="WikiText-2 test is not in a data folder and not downloadable"):
        data_sources.read_ppl_text("wikitext2")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(UserError, match="piqa files are not in a data folder .* no route to baber/piqa\\)"):
        data_sources.load_tasks(["piqa"], 1)
    assert not (hub.hub_data_root() / "tasks" / "piqa").exists()  # nothing half-written

    spec = tmp_path / "grid.toml"
    spec.write_text('[eval]\ntasks = ["piqa"]\n[[grid]]\nmodels = ["default"]\nmethods = ["uniform"]\nbudgets = [4.5]\n')
    assert_one_line_error(run_cli("sweep", str(spec), "--dry-run"), "grid.toml [eval] tasks: piqa files are not in")


def test_a_folder_with_wiki_test_raw_is_a_perplexity_text(tmp_path):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" \n = A = \n")
    assert data_sources.read_ppl_text(str(tmp_path))[1] == " \n = A = \n"


def test_cache_list_shows_fetched_data(fake_hub):
    from lsaq_mlx.cache_inventory import cache_entries

    fake_hub.rows[("EleutherAI/lambada_openai", "default", "test")] = [{"text": "a b c"}]
    data_sources.task_root("lambada")
    assert [(e.kind, e.model) for e in cache_entries()] == [("data", "tasks/lambada")]

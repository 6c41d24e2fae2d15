"""The second hardening pass, outside the server: every reader bounded, nothing a user owns
overwritten, the conversation kept, and every mistake one line and a non-zero exit.

(The server's cases are in test_serve_hostile.py.)"""

import io
import json
import os
import stat

import pytest
from cli_run import assert_one_line_error, run_cli
from fake_engine import FakeEngine

from lsaq_mlx.cli.chat_session import ChatSession
from lsaq_mlx.runtime.text import valid_text
from lsaq_mlx.documents import parse_json, read_json, read_toml
from lsaq_mlx.errors import UserError
from lsaq_mlx.evaluation.tasks import load_task
from lsaq_mlx.runtime.memory import ScriptedSampler

DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_TOML = "a = " + "[" * 100_000 + "]" * 100_000 + "\n"


# ---- readers: bounded depth and size, one line ----

@pytest.mark.parametrize("text", [DEEP_JSON, '{"a":' * 65 + "1" + "}" * 65], ids=["very-deep", "just-too-deep"])
def test_deep_json_is_one_user_error(text, tmp_path):
    with pytest.raises(UserError, match="nests deeper than 64 levels"):
        parse_json(text, "x")
    (tmp_path / "x.json").write_text(text)
    with pytest.raises(UserError, match="nests deeper"):
        read_json(tmp_path / "x.json")


def test_deep_toml_and_oversized_files_are_one_user_error(tmp_path):
    (tmp_path / "x.toml").write_text(DEEP_TOML)
    with pytest.raises(UserError, match="nests deeper"):
        read_toml(tmp_path / "x.toml")
    (tmp_path / "big.json").write_text("[" + "1," * 600 + "1]")
    with pytest.raises(UserError, match="is over 1 KB"):
        read_json(tmp_path / "big.json", max_bytes=1024)
    assert parse_json('{"a": [1, {"b": 2}]}', "x") == {"a": [1, {"b": 2}]}


@pytest.mark.parametrize("command", [
    ["plan", "--plan-file-placeholder"], ["plot-scores", "{file}", "-o", "{dir}/p.png"], ["sweep", "{toml}", "--dry-run"],
    ["plan", "-m", "{model}", "-b", "4"],
], ids=["plan-file", "scores-file", "sweep-spec", "model-config"])
def test_the_cli_reads_deep_files_in_one_line(command, tmp_path):
    (tmp_path / "deep.json").write_text(DEEP_JSON)
    (tmp_path / "deep.toml").write_text(DEEP_TOML)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(DEEP_JSON)
    if command[1] == "--plan-file-placeholder":
        command = ["convert", "--plan", "{file}", "-o", "{dir}/out"]
    args = [a.format(file=tmp_path / "deep.json", dir=tmp_path, toml=tmp_path / "deep.toml", model=tmp_path / "model")
            for a in command]
    assert_one_line_error(run_cli(*args), "nests deeper than 64 levels")


def test_eval_reads_only_the_text_it_needs(tmp_path, monkeypatch):
    from lsaq_mlx.evaluation import run as eval_run

    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        for _ in range(2000):
            f.write("The quick brown fox jumps over the lazy dog. " * 100 + "\n")  # 9 MB
    lengths = []

    class Counting:
        def encode(self, text):
            lengths.append(len(text))
            return [ord(c) for c in text]  # one token a character: the worst case for the guess

    name, tokens = eval_run.ppl_tokens(Counting(), str(big), 64)
    assert tokens == [ord(c) for c in "The quick brown fox jumps over the lazy dog. " * 2][:64]
    assert max(lengths) < 10_000  # not 9 MB


def test_eval_refuses_a_reference_with_another_vocabulary():
    from lsaq_mlx.evaluation.run import check_same_vocabulary

    class Vocab:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    check_same_vocabulary(Vocab({"a": 0, "b": 1}), Vocab({"a": 0, "b": 1}))
    with pytest.raises(UserError, match="another vocabulary .* token 'b' differs"):
        check_same_vocabulary(Vocab({"a": 0, "b": 1}), Vocab({"a": 0, "b": 2}))
    with pytest.raises(UserError, match="another vocabulary"):
        check_same_vocabulary(Vocab({"a": 0}), Vocab({"a": 0, "c": 1}))


def test_task_files_with_wrong_types_or_bytes_are_skipped_or_refused(tmp_path):
    wino = tmp_path / "winogrande"
    wino.mkdir()
    rows = [{"sentence": "I like _ a lot.", "option1": "tea", "option2": "rain"},
            {"sentence": "The cup beat _ .", "option1": "a", "option2": "b"},
            {"sentence": 7, "option1": "a", "option2": "b"},
            [1, 2], "not an object"]
    (wino / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (wino / "dev-labels.lst").write_text("1\n0\n2\n1\n1\n")  # label 0 is not a WinoGrande label
    task = load_task("winogrande", tmp_path)
    assert [(i.contexts[0], i.gold) for i in task.items] == [("I like tea", 0)] and task.skipped == 4
    (wino / "dev.jsonl").write_bytes(b'{"sentence": "\xff_"}\n')
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_task("winogrande", tmp_path)
    piqa = tmp_path / "piqa"
    piqa.mkdir()
    (piqa / "valid.jsonl").write_text(json.dumps({"goal": 3, "sol1": "a", "sol2": "b"}) + "\n"
                                      + json.dumps({"goal": "g", "sol1": ["a"], "sol2": "b"}) + "\n")
    (piqa / "valid-labels.lst").write_text("0\n1\n")
    assert load_task("piqa", tmp_path).skipped == 2


def test_memory_traces_must_be_text_of_known_pressures(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"1GB\n\xff\xfe\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        ScriptedSampler(tmp_path / "t.txt")
    (tmp_path / "t.txt").write_text("1GB,panic\n")
    with pytest.raises(UserError, match="t.txt:1"):
        ScriptedSampler(tmp_path / "t.txt")


def test_sweep_rows_with_missing_fields_are_ignored_not_fatal(tmp_path):
    from lsaq_mlx.sweep.results import read_results

    good = {"key": "k1", "status": "ok", "model": "m", "method": "uniform", "budget": 4.0, "bits_per_weight": 4.2,
            "eval": {"tasks": [], "perplexity": {"perplexity": 9.1}, "divergence": None}}
    broken = [{"key": "k2", "status": "ok", "model": "m", "method": "uniform", "eval": {}},  # no bits_per_weight
              {"key": "k3", "status": "failed", "model": "m", "method": "x"},  # no error
              {"key": "k4", "status": "ok", "model": "m", "method": "u", "bits_per_weight": 4, "eval": {"tasks": [{}]}},
              {"key": "k5", "status": "ok", "model": "m", "method": "u", "bits_per_weight": 4,
               "eval": {"perplexity": {"perplexity": "high"}}},
              {"key": "k6", "status": "maybe", "model": "m", "method": "u"}]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, *broken]) + "\xff\n")
    rows, malformed = read_results(path)
    assert list(rows) == ["k1"] and malformed == 6


# ---- writers: nothing a user owns overwritten ----

def test_sweep_writes_only_into_its_own_folder(tmp_path):
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    mine = tmp_path / "my-work"
    mine.mkdir()
    (mine / "results.md").write_text("my notes\n")
    for out in ["../my-work", str(mine), "../../elsewhere"]:
        (spec_dir / "grid.toml").write_text(f'out = "{out}"\n[[grid]]\nmodels = ["default"]\nmethods = ["uniform"]\n'
                                            'budgets = [4.5]\n')
        assert_one_line_error(run_cli("sweep", spec_dir / "grid.toml", "--dry-run"), "leads outside the spec's folder")
    from lsaq_mlx.sweep.results import claim_results_folder

    with pytest.raises(UserError, match="holds files lsaq-mlx did not write"):
        claim_results_folder(mine, force=False)
    assert (mine / "results.md").read_text() == "my notes\n"
    claim_results_folder(tmp_path / "new" / "results", force=False)  # new: made and marked
    claim_results_folder(tmp_path / "new" / "results", force=False)  # marked: a rerun writes there
    claim_results_folder(mine, force=True)
    assert (mine / ".lsaq-mlx").is_file()


def test_outputs_are_not_overwritten_without_force_and_keep_the_umask(tmp_path):
    from lsaq_mlx.cache import atomic_dir, atomic_file, check_output_file

    target = tmp_path / "plan.json"
    target.write_text("mine\n")
    with pytest.raises(UserError, match="already exists"):
        check_output_file(target, force=False)
    check_output_file(target, force=True)
    with pytest.raises(UserError, match="does not exist"):
        check_output_file(tmp_path / "nowhere" / "x.png", force=False)
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_file(target / "x.json", force=True)
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "new.json") as tmp:
            tmp.write_text("{}")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


@pytest.mark.parametrize("args, match", [
    (["plan", "-b", "4", "--method", "uniform", "--bits", "9"], "bits must be one of 2, 3, 4, 5, 6, 8, not 9 (--bits)"),
    (["plan", "-b", "4", "--group-size", "100"], "group size must be one of 32, 64, 128, not 100 (--group-size)"),
    (["convert", "-b", "4", "--group-size", "7", "-o", "{tmp}/out"], "not 7 (--group-size)"),
    (["plan", "--memory-budget", "1GB", "--context", "-100000000"], "context must be at least 1 token"),
    (["plan", "-b", "4", "--high-bits", "16"], "high bits must be one of"),
    (["eval", "--limit", "0", "--tasks", "piqa"], "items per task must be at least 1, not 0"),
    (["eval", "--limit", "-1", "--tasks", "piqa"], "not -1 (leave it out for all) (--limit)"),
    (["plan", "-b", "4", "-o", "{tmp}/exists.json"], "already exists (--force)"),
    (["plan", "-b", "4", "-o", "{tmp}/exists.json/x.json"], "is a file, not a folder"),
    (["score", "--plot", "{tmp}/no/dir/x.png"], "the folder {tmp}/no/dir does not exist"),
    (["plot-scores", "{tmp}/exists.json", "-o", "{tmp}/exists.json"], "already exists (--force)"),
])
def test_cli_mistakes_are_one_line_before_any_work(args, match, tmp_path):
    (tmp_path / "exists.json").write_text("mine\n")
    result = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(result, match.format(tmp=tmp_path))
    assert (tmp_path / "exists.json").read_text() == "mine\n"
    assert not (tmp_path / "no").exists() and not (tmp_path / "out").exists()


def test_a_folder_whose_quantization_disagrees_with_its_tensors_is_one_line(tiny_llama, tmp_path):
    out = tmp_path / "q"
    assert run_cli("convert", "-m", tiny_llama.path, "-b", "4", "-o", out).returncode == 0
    config = json.loads((out / "config.json").read_text())
    path = next(k for k in config["quantization"] if k.startswith("model.layers.0."))
    config["quantization"][path] = {"bits": 8, "group_size": 32}
    (out / "config.json").write_text(json.dumps(config))
    for command in (["plan", "-m", out, "-b", "3"], ["convert", "-m", out, "-b", "3", "-o", tmp_path / "q2"],
                    ["eval", "-m", out, "--max-tokens", "32"]):
        assert_one_line_error(run_cli(*command), f"quantizes {path} at 8 bits in groups of 32, but its tensors")


# ---- the conversation survives any message or command ----

def test_chat_keeps_the_conversation_and_saves_atomically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("precious\n")
    engine, out = FakeEngine(reply="fine").start(), io.StringIO()
    try:
        session = ChatSession(engine, 8, out=out)
        raw = b"hello \xff\xfe there".decode("utf-8", "surrogateescape")  # what stdin hands over
        for line in (raw, "next", "/save notes.txt", "/system", "/save --force out.json", "/save nodir/x.json"):
            assert session.handle(line)
    finally:
        engine.shutdown()
    printed = out.getvalue()
    assert "[notes.txt exists: /save --force notes.txt replaces it]" in printed
    assert "[usage: /system TEXT" in printed and "the folder nodir does not exist" in printed
    assert (tmp_path / "notes.txt").read_text() == "precious\n"
    saved = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert [m["content"] for m in saved] == ["hello \ufffd\ufffd there", "fine", "next", "fine"]
    assert not [p for p in tmp_path.iterdir() if "lsaq-tmp" in p.name]
    assert "\ud800" not in valid_text("a\ud800b") and "\ufffd" in valid_text("a\ud800b")


def test_the_engine_keeps_the_conversation_when_a_reply_fails(tiny_llama):
    from test_runtime import events_until

    from lsaq_mlx.planning.methods import plan_uniform
    from lsaq_mlx.planning.planner import FixedPlans, Planner
    from lsaq_mlx.runtime import Engine
    from lsaq_mlx.runtime.events import EngineError, ReplyDone
    from lsaq_mlx.runtime.options import RuntimeOptions

    plans = {8: plan_uniform(Planner(tiny_llama).context(), None, 8, 32)}
    engine = Engine(tiny_llama, FixedPlans(plans), RuntimeOptions(bits_budget=8)).start()
    try:
        engine.chat("first", 3)
        assert isinstance(events_until(engine, ReplyDone)[-1], ReplyDone)
        real = engine._generate
        engine._generate = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        engine.chat("this one fails", 3)
        assert isinstance(events_until(engine, ReplyDone)[-1], EngineError)
        engine._generate = real
        engine.chat("third", 3)
        assert isinstance(events_until(engine, ReplyDone)[-1], ReplyDone)
        assert [m["content"] for m in engine.messages if m["role"] == "user"] == ["first", "third"]
    finally:
        engine.shutdown()


def test_what_score_json_prints_is_a_scores_file(tmp_path, tiny_llama):
    out = run_cli("score", "-m", tiny_llama.path, "--metric", "zscore", "--json")
    assert out.returncode == 0, out.stderr
    (tmp_path / "s.json").write_text(out.stdout)
    plotted = run_cli("plot-scores", tmp_path / "s.json", "-o", tmp_path / "s.png")
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "s.png").stat().st_size > 0


def test_a_budget_outside_what_a_method_can_do_is_one_rule_both_ways(tiny_llama):
    for budget in ("1.5", "12"):
        assert_one_line_error(run_cli("plan", "-m", tiny_llama.path, "--method", "uniform", "-b", budget),
                              f"budget {budget} bits per weight is outside what uniform can do for this model: ")
    assert run_cli("plan", "-m", tiny_llama.path, "--method", "uniform", "-b", "8").returncode == 0


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    from lsaq_mlx import progress

    with progress.progress_bar("quick", 3) as advance:  # under a second: silent
        advance()
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "PLAIN_FIRST", 0.0)
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    with progress.progress_bar("slow", 4) as advance:
        advance(2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("slow: 2/4, 0 s, about 0 s left") and lines[-1].startswith("slow: done in")


def test_announcements_are_for_a_terminal_only(monkeypatch, capsys):
    from rich.console import Console

    from lsaq_mlx import progress

    progress.announce("importing x.gguf")  # stderr is not a terminal here
    assert capsys.readouterr().err == ""
    shown = io.StringIO()
    monkeypatch.setattr(progress, "stderr", Console(file=shown, force_terminal=True, width=200))
    progress.announce("importing x.gguf (98 MB) into the cache, once")
    assert "importing x.gguf (98 MB) into the cache, once" in shown.getvalue()

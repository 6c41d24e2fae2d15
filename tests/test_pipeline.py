"""A model over several Macs: the joint plan (plan --ranks) and pipelined generation
(generate --plan under mlx.launch)."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cli_run import run_cli
from hf_models import write_hf_folder
from lsaq_mlx.errors import UserError
from lsaq_mlx.planning.pipeline import PipelinePlan
from lsaq_mlx.planning.planner import PlanRequest, Planner
from lsaq_mlx.sources import resolve_model

LLAMA_3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
              "num_hidden_layers": 32, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "max_position_embeddings": 8192, "tie_word_embeddings": False}
PROMPT = "The capital of France is"


def test_the_joint_plan_never_exceeds_a_ranks_memory():
    planner = Planner(resolve_model("default"))
    rng = random.Random(0)
    planned = refused = 0
    for _ in range(20):
        n = rng.choice([2, 3])
        memories = [rng.randint(50, 260) * 1_000_000 for _ in range(n)]
        bits = [rng.choice([3.0, 4.0, 5.5])] if rng.random() < 0.5 else []
        request = PlanRequest(context=rng.choice([256, 1024]), bits_budgets=bits)
        try:
            plan = planner.pipeline_plan(request, memories, shape_only=True)
        except UserError as e:
            assert "rank" in str(e) and "short by" in str(e)
            refused += 1
            continue
        planned += 1
        assert [s.first_layer for s in plan.ranks][0] == 0 and plan.ranks[-1].end_layer == 30
        assert all(a.end_layer == b.first_layer for a, b in zip(plan.ranks, plan.ranks[1:]))
        for share, memory in zip(plan.ranks, memories):
            assert share.memory_bytes == memory and share.free_bytes >= 0, share
        if bits:
            assert plan.plan.predicted_bits_per_weight <= bits[0] + 1e-3
        held = sum(s.weight_bytes for s in plan.ranks)
        assert held >= plan.plan.predicted_bytes  # the tied embedding is held twice
    assert planned >= 5 and refused >= 1


def test_a_plan_on_paper_reads_only_a_config(tmp_path):
    folder = tmp_path / "llama-3-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_3_8B))
    out = tmp_path / "pipeline.json"
    done = run_cli("plan", "-m", str(folder / "config.json"), "--ranks", "12GB,6GB", "--dry-run", "--context", "8192",
                   "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["priced_from"] == "config"
    plan = PipelinePlan.load(out)
    shares = plan.ranks
    assert [s.memory_bytes for s in shares] == [12_000_000_000, 6_000_000_000]
    assert all(s.free_bytes >= 0 for s in shares)
    assert shares[0].end_layer > 32 / 2  # the larger Mac holds more layers
    assert 4 < plan.plan.predicted_bits_per_weight < 16
    too_small = run_cli("plan", "-m", str(folder), "--ranks", "2GB,1GB", "--dry-run")
    assert too_small.returncode == 1 and "short by" in too_small.stderr and len(too_small.stderr.splitlines()) == 1


def test_ranks_take_sizes_or_a_hostfile_with_memory(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "a", "ips": ["10.0.0.1"], "memory": "180MB"},
                                    {"ssh": "b", "ips": ["10.0.0.2"], "memory": "120MB"}]))
    by_file = run_cli("plan", "--ranks", str(hostfile), "--context", "512", "--dry-run", "-m", "default", "--json")
    by_sizes = run_cli("plan", "--ranks", "180MB,120MB", "--context", "512", "--dry-run", "-m", "default", "--json")
    assert by_file.returncode == 0, by_file.stderr
    assert json.loads(by_file.stdout)["ranks"] == json.loads(by_sizes.stdout)["ranks"]
    hostfile.write_text(json.dumps([{"ssh": "a"}, {"ssh": "b"}]))
    for bad in (str(hostfile), "1GB", "lots,more"):
        done = run_cli("plan", "--ranks", bad, "--dry-run")
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.fixture(scope="module")
def pipeline_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    done = run_cli("plan", "--ranks", "180MB,110MB", "--context", "1024", "-o", str(folder / "pipe.json"))
    assert done.returncode == 0, done.stderr
    return folder / "pipe.json"


def test_one_process_runs_a_pipeline_plan_as_its_whole_plan(pipeline_file, tmp_path):
    plan = PipelinePlan.load(pipeline_file)
    plan.plan.save(tmp_path / "whole.json")
    texts = []
    for path in (pipeline_file, tmp_path / "whole.json"):
        done = run_cli("generate", "--plan", str(path), "-p", PROMPT, "-n", "12", "--json")
        assert done.returncode == 0, done.stderr
        texts.append(json.loads(done.stdout)["text"])
    plain = run_cli("generate", "-p", PROMPT, "-n", "12", "--json")  # no plan: the source as it is
    assert texts[0] == texts[1] and json.loads(plain.stdout)["text"]


def test_a_damaged_pipeline_plan_is_one_line(pipeline_file, tmp_path):
    data = json.loads(pipeline_file.read_text())
    data["ranks"][1]["first_layer"] += 1  # a gap between the ranks' layers
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    done = run_cli("generate", "--plan", str(bad), "-p", PROMPT, "-n", "4")
    assert done.returncode == 1 and "do not cover" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def _launch(n: int, *args, timeout=600):
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    return subprocess.run([launcher, "-n", str(n), "--backend", "ring", "--", sys.executable, "-m", "lsaq_mlx", *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _json_on(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


@pytest.mark.slow
@pytest.mark.parametrize("ranks", ["120MB,90MB,110MB"])  # two ranks: the chat, server and adaptive tests
def test_pipelined_ranks_generate_what_one_process_does(ranks, tmp_path):
    path = tmp_path / "pipe.json"
    assert run_cli("plan", "--ranks", ranks, "--context", "1024", "-o", str(path)).returncode == 0
    args = ("generate", "--plan", str(path), "-p", PROMPT, "-n", "16", "--json")
    one = run_cli(*args)
    many = _launch(len(ranks.split(",")), *args)
    assert many.returncode == 0 and "error" not in many.stderr, many.stderr
    report = _json_on(many.stdout)
    assert report["text"] == json.loads(one.stdout)["text"]
    plan = PipelinePlan.load(path)
    shown = {r["rank"]: r for r in report["ranks"]}
    assert [shown[s.rank]["layers"] for s in plan.ranks] == [f"{s.first_layer}-{s.end_layer - 1}" for s in plan.ranks]
    assert report["bytes_between_ranks_per_token"] > 0


@pytest.mark.slow
def test_ranks_read_only_their_share_of_an_adaptive_folder(tmp_path):
    """Each rank builds its layers from its own copy of an adaptive folder: modules kept at
    their stored setting keep their codes, the others are read a few rows at a time, so a
    rank's peak follows its share (before, every rank dequantized the 49k x 576 embedding
    whole: both peaked at 0.86 GB)."""
    folder, path = tmp_path / "adaptive", tmp_path / "pipe.json"
    assert run_cli("convert", "--adaptive", "4-6", "-o", str(folder)).returncode == 0
    planned = run_cli("plan", "-m", str(folder), "--ranks", "180MB,110MB", "--context", "512", "-o", str(path))
    assert planned.returncode == 0, planned.stderr
    args = ("generate", "-m", str(folder), "--plan", str(path), "-p", PROMPT, "-n", "12", "--json")
    one = run_cli(*args)
    two = _launch(2, *args)
    assert two.returncode == 0 and "error" not in two.stderr, two.stderr
    report = _json_on(two.stdout)
    assert report["text"] == json.loads(one.stdout)["text"]
    plan = PipelinePlan.load(path)
    peaks = [r["peak_memory_bytes"] for r in sorted(report["ranks"], key=lambda r: r["rank"])]
    shares = [s.weight_bytes for s in plan.ranks]
    assert shares[1] < 0.5 * shares[0] and peaks[1] < 0.6 * peaks[0], (shares, peaks)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe", "qwen3_next"])
def test_dense_moe_and_hybrid_models_pipeline_from_hugging_face_folders(model_type, tmp_path):
    folder = write_hf_folder(model_type, tmp_path / model_type, resolve_model("default").path)
    path = tmp_path / "pipe.json"
    planned = run_cli("plan", "-m", str(folder), "--ranks", "30MB,30MB", "--context", "256", "-o", str(path))
    assert planned.returncode == 0, planned.stderr
    assert [(s.first_layer, s.end_layer) for s in PipelinePlan.load(path).ranks] == [(0, 1), (1, 2)]
    args = ("generate", "-m", str(folder), "--plan", str(path), "-p", PROMPT, "-n", "8", "--json")
    one = run_cli(*args)
    two = _launch(2, *args)
    assert two.returncode == 0 and "error" not in two.stderr, two.stderr
    assert _json_on(two.stdout)["text"] == json.loads(one.stdout)["text"]


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_with_one_line(pipeline_file):
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    run = subprocess.Popen([launcher, "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "lsaq_mlx",
                            "generate", "--plan", str(pipeline_file), "-p", "Count from 1 to 1000: 1, 2, 3,",
                            "-n", "4000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not _rank_pids(1, str(pipeline_file)):
        time.sleep(0.5)
    time.sleep(8)  # loaded and generating
    killed = time.monotonic()
    for pid in _rank_pids(1, str(pipeline_file)):
        subprocess.run(["kill", "-9", str(pid)])
    _, stderr = run.communicate(timeout=120)
    assert time.monotonic() - killed < 30
    lines = [line for line in stderr.splitlines() if line.startswith(("error", "stopped"))]
    # mlx.launch may exit before relaying rank 0's last line: at most one, and it names the cause
    assert len(lines) <= 1 and all("another rank" in line for line in lines), stderr


ENDING_INTERRUPTED = """
import os, signal
from lsaq_mlx.runtime.pipeline import guard
signal.signal(signal.SIGTERM, lambda *_: guard.end_pipeline(0, "mlx.launch stopped this rank"))
guard.before_exit(lambda: os.kill(os.getpid(), signal.SIGTERM))  # the handler runs inside the ending
guard.end_pipeline(0, "another rank ended: its connection was lost")
"""


def test_a_sigterm_while_a_rank_ends_does_not_hang_it():
    """Seen in CI: rank 0 ending on a lost peer got mlx.launch's SIGTERM inside
    ``end_pipeline``, whose handler then waited forever for the lock its own thread held."""
    ended = subprocess.run([sys.executable, "-c", ENDING_INTERRUPTED], capture_output=True, text=True, timeout=60)
    assert ended.returncode == 1
    assert ended.stderr.splitlines() == ["error: the pipeline stopped (another rank ended: its connection was lost)"]


def _rank_pids(rank: int, marker: str = "lsaq_mlx") -> list[int]:
    """The processes of ``rank`` whose command line holds ``marker`` (this test's plan file)."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"MLX_RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0") \
                    and marker.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _perplexity(stdout: str) -> float:
    return _json_on(stdout)["perplexity"]["perplexity"]


def test_eval_takes_a_plan_in_one_process(pipeline_file):
    done = run_cli("eval", "--plan", str(pipeline_file), "--ppl", "packaged", "--max-tokens", "256", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["divergence"]["kl"] > 0 and report["perplexity"]["tokens"] > 0  # against the source itself
    both = run_cli("eval", "--plan", str(pipeline_file), "-b", "4", "--ppl", "packaged")
    assert both.returncode == 1 and "not both" in both.stderr


@pytest.mark.slow
def test_pipelined_eval_measures_the_perplexity_of_one_process(pipeline_file):
    args = ("eval", "--plan", str(pipeline_file), "--ppl", "packaged", "--max-tokens", "512", "--json")
    one = run_cli(*args)
    two = _launch(2, *args)
    assert two.returncode == 0 and "error" not in two.stderr, two.stderr
    assert _perplexity(two.stdout) == pytest.approx(_perplexity(one.stdout), rel=1e-5)


CHAT = "What is the capital of France?\nAnd of Spain?\n/stats\n/quit\n"


def test_chat_takes_a_plan_in_one_process(pipeline_file):
    done = run_cli("chat", "--plan", str(pipeline_file), "-n", "8", input=CHAT)
    assert done.returncode == 0, done.stderr
    assert len([line for line in done.stdout.splitlines() if line.strip()]) >= 2
    fixed = run_cli("chat", "--plan", str(pipeline_file), "-b", "4", input="/quit\n")
    assert fixed.returncode == 1 and "--plan sets the precision" in fixed.stderr
    one_process_auto = run_cli("chat", "--plan", str(pipeline_file), "--auto", input="/quit\n")
    assert one_process_auto.returncode == 1 and "--rank-budgets" in one_process_auto.stderr


@pytest.mark.slow
def test_a_pipelined_chat_replies_as_one_process_and_shows_every_rank(pipeline_file):
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    args = ["chat", "--plan", str(pipeline_file), "-n", "12"]
    one = run_cli(*args, input=CHAT)
    # mlx.launch relays standard input line by line and never closes it: /quit ends the chat
    two = subprocess.run([launcher, "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "lsaq_mlx", *args],
                         input=CHAT, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0 and "error" not in two.stderr, two.stderr
    replies = lambda out: [line for line in out.splitlines() if line.strip() and not line.startswith(("plan:", "memory:", "MLX:", "rank ", "last reply"))]  # noqa: E731
    assert replies(two.stdout) == replies(one.stdout)  # two turns: the second reuses the cache
    plan = PipelinePlan.load(pipeline_file)
    for share in plan.ranks:
        assert f"rank {share.rank}: layers {share.first_layer}-{share.end_layer - 1}," in two.stdout + two.stderr


@pytest.mark.slow
def test_a_pipelined_server_answers_and_reports_every_rank(pipeline_file, tmp_path):
    import socket
    import urllib.request

    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")  # a file: an undrained pipe would block the ranks once full
    # Ctrl+C as in a terminal: a suite run in the background (nohup, &) starts with SIGINT ignored, and so would the ranks
    server = subprocess.Popen([launcher, "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "lsaq_mlx",
                               "serve", "--plan", str(pipeline_file), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=log, text=True, stdin=subprocess.DEVNULL,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{base}/models", timeout=5)
                break
            except OSError:
                time.sleep(1)
        body = json.dumps({"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"{base}/completions", body, {"Content-Type": "application/json"})
        text = json.loads(urllib.request.urlopen(request, timeout=300).read())["choices"][0]["text"]
        one = run_cli("generate", "--plan", str(pipeline_file), "-p", PROMPT, "-n", "8", "--json")
        assert text == json.loads(one.stdout)["text"]
        status = json.loads(urllib.request.urlopen(f"{base}/status", timeout=60).read())
        assert [r["rank"] for r in status["ranks"]] == [0, 1]
        assert all(r["rss_bytes"] > 0 and r["layer_bits"] for r in status["ranks"])
    finally:
        interrupted = _rank_pids(0, str(port))
        for pid in interrupted:  # Ctrl+C on rank 0: it stops the server, then the ranks that follow it
            subprocess.run(["kill", "-INT", str(pid)])
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for pid in _rank_pids(0, str(port)) + _rank_pids(1, str(port)):  # their threads' stacks, to the log
                subprocess.run(["kill", "-USR1", str(pid)])
            time.sleep(3)
            server.kill()
            raise AssertionError(f"the server did not stop within 60 s of Ctrl+C to rank 0 (pids {interrupted}):\n"
                                 + (tmp_path / "server.log").read_text()[-12000:]) from None
        finally:
            log.close()


@pytest.mark.slow
def test_a_memory_trace_on_one_rank_swaps_only_its_layers_while_a_reply_streams(tmp_path):
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    path = tmp_path / "pipe.json"
    planned = run_cli("plan", "--ranks", "180MB,110MB", "--context", "1024", "--rank-budgets", "3,4,5", "-o", str(path))
    assert planned.returncode == 0, planned.stderr
    plan = PipelinePlan.load(path)
    assert all(len(plans) >= 2 and plans[-1].predicted_bytes == s.weight_bytes
               for s, plans in zip(plan.ranks, plan.rank_plans))
    trace = tmp_path / "rank1.trace"
    trace.write_text("10MB\n" * 100)  # rank 1 has almost no memory left from its first sample on
    chat = subprocess.run([launcher, "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "lsaq_mlx", "chat",
                           "--plan", str(path), "--auto", "--memory-trace", f"1:{trace}", "-n", "24"],
                          input="What is the capital of France?\n/stats\n/quit\n", capture_output=True, text=True,
                          timeout=600)
    assert chat.returncode == 0 and "error" not in chat.stderr, chat.stderr
    shown = chat.stdout + chat.stderr
    smallest, top = plan.rank_plans[1][0], plan.rank_plans[0][-1]
    layers = [f"{s.first_layer}-{s.end_layer - 1}" for s in plan.ranks]
    assert f"rank 1: layers {layers[1]}, {smallest.predicted_bits_per_weight:.2f} bits/weight" in shown  # swapped down
    assert f"plan 1 of {len(plan.rank_plans[1])}, 1 swaps" in shown
    assert f"rank 0: layers {layers[0]}, {top.predicted_bits_per_weight:.2f} bits/weight" in shown  # kept its share
    assert f"plan {len(plan.rank_plans[0])} of {len(plan.rank_plans[0])}, 0 swaps" in shown


def test_the_tui_takes_a_hostfile_with_a_plan_and_wants_a_terminal(pipeline_file, tmp_path):
    from cli_run import assert_one_line_error

    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]))
    no_ips = tmp_path / "no_ips.json"
    no_ips.write_text(json.dumps({"hosts": [{"ssh": "a"}, {"ssh": "b"}]}))
    plan = ("--plan", str(pipeline_file))
    assert_one_line_error(run_cli("tui", "--hostfile", str(one)), "give its --plan")
    assert_one_line_error(run_cli("tui", *plan, "--hostfile", str(one)), "two or more hosts")
    assert_one_line_error(run_cli("tui", *plan, "--hostfile", str(no_ips)), "host 0 has no \"ips\"")
    assert_one_line_error(run_cli("tui", *plan, "--hostfile", str(tmp_path / "missing.json")), "--hostfile")
    under_launch = run_cli("tui", *plan, env={**__import__("os").environ, "MLX_RANK": "0"})
    assert_one_line_error(under_launch, "the TUI needs a terminal")


def test_the_whole_model_of_a_pipeline_counts_every_rank():
    from lsaq_mlx.runtime.pipeline import PipelineStage

    ranks = [{"weight_bytes": 600, "bits_per_weight": 6.0, "layer_bits": [6.0, 6.0]},
             {"weight_bytes": 300, "bits_per_weight": 4.0, "layer_bits": [4.0]}]
    whole = PipelineStage.whole_model(ranks, 8.0)
    # 800 + 600 weights hold 7200 bits
    assert whole == {"weight_bytes": 900, "bits_per_weight": 7200 / 1400,
                     "layer_bits": {"layers": [6.0, 6.0, 4.0], "other": 8.0}}


@pytest.mark.slow
def test_the_tui_runs_rank_0_in_the_terminal_shows_every_rank_and_ends_when_one_dies(tmp_path):
    """``tui --plan P --hostfile H``: rank 0 draws in the terminal and starts rank 1; the
    layers panel shows rank 1 moving to its smaller plan on its own memory (a trace); Ctrl-C
    ends both; a killed rank 1 ends rank 0 in one line with the terminal given back."""
    from terminal import Terminal

    path, hosts, trace = tmp_path / "pipe.json", tmp_path / "hosts.json", tmp_path / "rank1.trace"
    planned = run_cli("plan", "--ranks", "180MB,110MB", "--context", "1024", "--rank-budgets", "3,4,5", "-o", str(path))
    assert planned.returncode == 0, planned.stderr
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    trace.write_text("10MB\n" * 1000)
    args = ["tui", "--plan", str(path), "--hostfile", str(hosts), "--auto", "--memory-trace", f"1:{trace}"]
    plans = len(PipelinePlan.load(path).rank_plans[1])

    term = Terminal(args, rows=40, columns=120)
    try:
        term.read_until(lambda: f"plan 1/{plans} · 1 swaps".encode() in term.seen)  # rank 1 swapped down
        assert b"rank 0" in term.seen and b"rank 1" in term.seen, term.seen[-2000:]
        assert f"plan 1/{plans} · 1 swaps".encode() in term.seen
        term.type(b"\x03")
        term.read_until(lambda: False, 0.5)
        term.type(b"\x03")
        assert term.wait_exit() == 0 and b"Traceback" not in term.seen
    finally:
        term.close()
    time.sleep(1)
    assert not _rank_pids(1, str(path))  # rank 1 ended with rank 0

    term = Terminal(args, rows=40, columns=120)
    try:
        term.read_until(lambda: b"rank 1" in term.seen)
        for pid in _rank_pids(1, str(path)):
            subprocess.run(["kill", "-9", str(pid)])
        killed = time.monotonic()
        assert term.wait_exit() == 1 and time.monotonic() - killed < 30
        after = term.seen[term.seen.rindex(b"\x1b[?1049l"):].decode(errors="replace")  # after the screen is back
        assert [line for line in after.splitlines() if line.strip()] == \
            ["\x1b[?1049lerror: the pipeline stopped (rank 1 was killed by signal 9)"], after
    finally:
        term.close()

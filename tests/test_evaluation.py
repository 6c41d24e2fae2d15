import json
import math
import os

import mlx.core as mx
import pytest

from cli_run import assert_one_line_error, run_cli
from lsaq_mlx.errors import UserError
from lsaq_mlx.evaluation.run import EvalRequest, evaluate
from lsaq_mlx.sources import load_model, resolve_model
from lsaq_mlx.evaluation.tasks import load_task
from lsaq_mlx.evaluation.zeroshot import choice_logprobs, evaluate_task


@pytest.fixture
def tiny(tiny_llama):
    return tiny_llama


def write_tasks(root):
    (root / "piqa").mkdir(parents=True)
    rows = [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the jar"},
            {"goal": "Dry hair", "sol1": "use a towel", "sol2": "use a brick"}]
    (root / "piqa" / "valid.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n{not json\n")
    (root / "piqa" / "valid-labels.lst").write_text("0\n0\n1\n")
    (root / "winogrande").mkdir()
    row = {"sentence": "The cup fell off the table because _ was tilted.", "option1": "the cup", "option2": "the table"}
    (root / "winogrande" / "dev.jsonl").write_text(json.dumps(row) + "\n")
    (root / "winogrande" / "dev-labels.lst").write_text("2\n")
    (root / "lambada").mkdir()
    (root / "lambada" / "lambada_test.jsonl").write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")


def by_hand(model, tokenizer, context, continuation):
    whole = tokenizer.encode(context + continuation)
    n = len(tokenizer.encode(context))
    logits = model(mx.array(whole)[None])[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n, len(whole)))


def test_items_are_scored_like_the_harness(tiny, tmp_path):
    write_tasks(tmp_path / "tasks")
    model, tokenizer, _ = load_model(tiny)
    piqa = load_task("piqa", tmp_path / "tasks")
    assert len(piqa.items) == 2 and piqa.skipped == 1
    assert piqa.items[0].contexts[0] == "Question: Open a jar\nAnswer:" and piqa.items[0].continuations[0] == " twist the lid"
    result = evaluate_task(model, tokenizer, piqa)
    expected_acc, expected_norm = [], []
    for item in piqa.items:
        sums = [by_hand(model, tokenizer, c, x) for c, x in zip(item.contexts, item.continuations)]
        batched = [s for s, _ in choice_logprobs(model, tokenizer, item.contexts, item.continuations)]
        assert batched == pytest.approx(sums, rel=1e-4)  # choices of different lengths, padded in one batch
        expected_acc.append(max(range(2), key=lambda i: sums[i]) == item.gold)
        norms = [s / len(x.encode()) for s, x in zip(sums, item.continuations)]
        expected_norm.append(max(range(2), key=lambda i: norms[i]) == item.gold)
    assert result.acc == pytest.approx(sum(expected_acc) / 2) and result.acc_norm == pytest.approx(sum(expected_norm) / 2)
    wino = load_task("winogrande", tmp_path / "tasks").items[0]
    assert wino.contexts == ["The cup fell off the table because the cup", "The cup fell off the table because the table"]
    assert wino.continuations == [" was tilted."] * 2 and wino.gold == 1
    lambada = evaluate_task(model, tokenizer, load_task("lambada", tmp_path / "tasks"))
    assert lambada.perplexity == pytest.approx(math.exp(-by_hand(model, tokenizer, "the cat sat on the", " mat")), rel=1e-3)


def test_eval_perplexity_matches_mlx_lm_and_self_kl_is_zero(tiny, tmp_path):
    from mlx_lm import load

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = evaluate(tiny, EvalRequest(ppl=str(text), max_tokens=600, seq_len=128), reference=tiny)
    assert result.divergence["kl"] == pytest.approx(0.0, abs=1e-4) and result.divergence["top1_agreement"] == 1.0
    model, tokenizer = load(str(tiny.path))
    tokens = tokenizer.encode(text.read_text())[:600]
    total, count = 0.0, 0
    for start in range(0, len(tokens), 128):
        w = tokens[start : start + 128]
        logits = model(mx.array(w[:-1])[None])[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        total -= sum(lp[i, w[i + 1]].item() for i in range(len(w) - 1))
        count += len(w) - 1
    assert result.perplexity["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-3)


def test_eval_of_a_converted_model_matches_mlx_lm_perplexity(tiny, tmp_path):
    from mlx_lm import load
    from mlx_lm.perplexity import eval_ppl

    from lsaq_mlx.convert import convert
    from lsaq_mlx.planning.methods import PlanningContext, plan_uniform

    model, _, _ = load_model(tiny, compute=False)
    convert(tiny, plan_uniform(PlanningContext(model, tiny.fingerprint), None, 4, 32), tmp_path / "q4")
    text = tmp_path / "text.txt"
    text.write_text("A bird in the hand is worth two in the bush, said the fox to the hen. " * 40)
    ours = evaluate(resolve_model(str(tmp_path / "q4")), EvalRequest(ppl=str(text), max_tokens=512, seq_len=128))
    quantized, tokenizer = load(str(tmp_path / "q4"))  # mlx-lm's own model: quantized kernels, float16 scales
    data = mx.array(tokenizer.encode(text.read_text())[:512]).reshape(-1, 128)
    theirs, _ = eval_ppl(quantized, data, batch_size=2)
    assert ours.perplexity["tokens"] == 4 * 127
    assert ours.perplexity["perplexity"] == pytest.approx(theirs, rel=1e-3)


def test_eval_errors(tiny, tmp_path):
    with pytest.raises(UserError, match="unknown task"):
        evaluate(tiny, EvalRequest(ppl=None, tasks=["mmlu"]))
    with pytest.raises(UserError, match="task file not found"):
        evaluate(tiny, EvalRequest(ppl=None, tasks=["piqa"], task_dir=tmp_path))
    env = dict(os.environ)
    assert_one_line_error(run_cli("eval", "-m", tiny.origin, "--ppl", str(tmp_path / "no.txt"), env=env),
                          "not found")
    write_tasks(tmp_path / "tasks")
    out = json.loads(run_cli("eval", "-m", tiny.origin, "--ppl", "none", "--tasks", "piqa,lambada",
                             "--data-dir", str(tmp_path / "tasks"), "--json", env=env).stdout)
    assert [t["task"] for t in out["tasks"]] == ["piqa", "lambada"] and out["tasks"][0]["skipped"] == 1

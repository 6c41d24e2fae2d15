import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from lsaq_mlx.backend import attention
from lsaq_mlx.backend.allocator import return_freed_memory, reused_buffers
from lsaq_mlx.backend.attention import QUERY_BLOCK, blockwise_causal, causal_attention_in_blocks
from lsaq_mlx.backend.blas import preloaded_openblas, single_threaded_blas
from lsaq_mlx.backend.cores import map_on_cores
from lsaq_mlx.errors import UserError
from tiny_models import tiny_model


def test_map_on_cores_keeps_order_and_reports_on_the_calling_thread():
    caller, threads, reported = threading.current_thread(), set(), []

    def work(n):
        threads.add(threading.current_thread())
        x = mx.arange(n, dtype=mx.float32)
        return (x @ x).item()

    def on_done(n):
        assert threading.current_thread() is caller
        reported.append(n)

    items = list(range(1, 40))
    assert map_on_cores(work, items, on_done, workers=3) == [float(sum(i * i for i in range(n))) for n in items]
    assert sorted(reported) == items and caller not in threads
    assert all(thread.name.startswith("lsaq-mlx-core") for thread in threads)


def test_map_on_cores_raises_a_worker_error_and_stops():
    started = []

    def work(n):
        started.append(n)
        if n == 2:
            raise UserError("bad item")
        return n

    with pytest.raises(UserError, match="bad item"):
        map_on_cores(work, list(range(200)), workers=2)
    assert len(started) < 200
    threads = threading.active_count()
    assert map_on_cores(lambda n: n + 1, [1, 2, 3], workers=2) == [2, 3, 4]
    assert threading.active_count() == threads  # the same workers serve every call


def test_a_process_that_scored_on_workers_exits_cleanly():
    """Workers that ended during interpreter shutdown used to abort it (MLX's per-thread
    compile cache is freed through Python): about one exit in three, so run several."""
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        from tiny_models import tiny_model
        from lsaq_mlx.scoring.metrics import lens_statistics
        print(lens_statistics(tiny_model("llama"), [[1, 2, 3, 4, 5] * 30] * 3, k=5, workers=2)[2])
    """ % str(Path(__file__).parent))
    for _ in range(6):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert (run.returncode, run.stdout.strip()) == (0, "450"), run.stderr[-500:]


def test_reused_buffers_raises_the_cache_limit_and_restores_it():
    before = mx.set_cache_limit(64 << 20)
    try:
        with reused_buffers(1 << 30):
            assert mx.set_cache_limit(1 << 30) == 1 << 30  # inside: at least the size asked for
            big = mx.ones((1 << 26,))  # 256 MB, freed into the cache
            mx.eval(big)
            del big
            assert mx.get_cache_memory() >= 1 << 28
        assert mx.set_cache_limit(64 << 20) == 64 << 20  # restored, the cache trimmed to it
        assert mx.get_cache_memory() <= 64 << 20
        with reused_buffers(1 << 20):  # never lowers a larger limit
            assert mx.set_cache_limit(64 << 20) == 64 << 20
        return_freed_memory()
        assert mx.get_cache_memory() == 0
    finally:
        mx.set_cache_limit(before)


def test_single_threaded_blas_restores_the_thread_count():
    library = preloaded_openblas()
    if library is None:
        pytest.skip("no preloaded OpenBLAS in this process")
    threads = library.openblas_get_num_threads()
    with single_threaded_blas():
        assert library.openblas_get_num_threads() == 1
    assert library.openblas_get_num_threads() == threads


@pytest.mark.parametrize("length", [QUERY_BLOCK + 1, 3 * QUERY_BLOCK, 200])
def test_blockwise_causal_attention_equals_masked_attention(length):
    key = mx.random.key(length)
    q, k, v = (mx.random.normal(shape, key=mx.random.split(key, 3)[i])
               for i, shape in enumerate([(2, 4, length, 16), (2, 2, length, 16), (2, 2, length, 16)]))
    sdpa = mx.fast.scaled_dot_product_attention
    expected = sdpa(q, k, v, scale=0.25, mask="causal")
    got = blockwise_causal(sdpa)(q, k, v, scale=0.25, mask="causal")
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-6)


def test_blockwise_causal_passes_other_attention_through():
    calls = []

    def spy(q, k, v, scale, mask=None):
        calls.append((q.shape[-2], k.shape[-2], mask if isinstance(mask, str) or mask is None else "array"))
        return q

    blocked = blockwise_causal(spy)
    long, short = mx.zeros((1, 1, 3 * QUERY_BLOCK, 4)), mx.zeros((1, 1, QUERY_BLOCK, 4))
    blocked(short, short, short, scale=1.0, mask="causal")
    blocked(long, long, long, scale=1.0, mask=mx.ones((3 * QUERY_BLOCK, 3 * QUERY_BLOCK), mx.bool_))
    blocked(long, long, long, scale=1.0, mask=None)
    blocked(short, long, long, scale=1.0, mask="causal")  # decoding against a cache
    assert calls == [(QUERY_BLOCK, QUERY_BLOCK, "causal"), (3 * QUERY_BLOCK, 3 * QUERY_BLOCK, "array"),
                     (3 * QUERY_BLOCK, 3 * QUERY_BLOCK, None), (QUERY_BLOCK, 3 * QUERY_BLOCK, "causal")]
    calls.clear()
    blocked(long, long, long, scale=1.0, mask="causal")
    assert calls == [(QUERY_BLOCK, (i + 1) * QUERY_BLOCK, "causal") for i in range(3)]


def test_models_run_blocked_attention_within_the_context(monkeypatch):
    model = tiny_model("llama")
    tokens = mx.array([[(5 * i) % 300 for i in range(150)]])
    expected = model(tokens)
    real, query_lengths = mx.fast.scaled_dot_product_attention, []

    def counted(q, *args, **kwargs):
        query_lengths.append(q.shape[-2])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", counted)
    with causal_attention_in_blocks():
        blocked = mx.fast.scaled_dot_product_attention
        with causal_attention_in_blocks():  # nested: wrapped once
            assert mx.fast.scaled_dot_product_attention is blocked
            got = model(tokens)
    assert mx.fast.scaled_dot_product_attention is counted
    assert query_lengths == [QUERY_BLOCK, QUERY_BLOCK, 150 - 2 * QUERY_BLOCK] * len(model.layers)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-5)
    monkeypatch.setattr(attention, "backend", lambda: "gpu")
    with causal_attention_in_blocks():
        assert mx.fast.scaled_dot_product_attention is counted

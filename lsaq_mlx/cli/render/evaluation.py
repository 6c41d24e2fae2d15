"""An ``EvalResult`` as lines a person reads."""

from lsaq_mlx.cli.output import err


def print_eval(result) -> None:
    if result.perplexity:
        p = result.perplexity
        print(f"perplexity {p['perplexity']:.3f} (mean NLL {p['mean_nll']:.4f} ± {p['stderr_nll']:.4f}) on {p['tokens']} "
              f"tokens of {p['data']}, windows of {p['seq_len']}")
    if result.divergence:
        d = result.divergence
        print(f"KL to {d['reference']}: {d['kl']:.4f} ± {d['kl_stderr']:.4f} nats/token · top-1 agreement "
              f"{d['top1_agreement']:.3f}")
    for t in result.tasks:
        extra = f" · acc_norm {t['acc_norm']:.3f} ± {t['acc_norm_stderr']:.3f}" if t["acc_norm"] is not None else ""
        extra += f" · perplexity {t['perplexity']:.2f}" if t["perplexity"] is not None else ""
        skipped = f" ({t['skipped']} malformed rows skipped)" if t["skipped"] else ""
        print(f"{t['task']}: acc {t['acc']:.3f} ± {t['acc_stderr']:.3f}{extra} on {t['items']} items{skipped}")
    err(f"{result.wall_seconds:.1f} s")

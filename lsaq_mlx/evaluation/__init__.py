"""Evaluation of a model: perplexity, KL to a reference, zero-shot tasks (run.py runs ``eval``)."""

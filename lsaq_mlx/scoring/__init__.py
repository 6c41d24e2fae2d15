"""Stage 2, layer importance: ``LayerScores`` (scores.py), the metrics (metrics.py) and
the logit lens they use (lens.py), calibration text (calibration.py), and the scoring
run that caches them (run.py)."""

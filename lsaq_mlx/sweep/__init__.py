"""Grids of models x methods x budgets: the run (run.py) and its report (report.py)."""

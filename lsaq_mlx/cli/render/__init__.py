"""How the CLI shows results to a person (``--json`` prints the data itself)."""

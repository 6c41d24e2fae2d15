"""The CLI's output: data on stdout (one JSON document with ``--json``), everything for
people (progress, notes, errors) on stderr."""

import json
import sys


def emit_json(data) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

"""What every benchmark script does with its result: print it as JSON and,
with `--out`, write the same text there (the copies under `docs/results/`)."""

from __future__ import annotations

import json
import os


def emit(result: dict, out: str | None, indent: int = 2) -> dict:
    """Prints `result` as JSON; with `out`, also writes it to that file
    (its folder created). Returns `result`."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    return result

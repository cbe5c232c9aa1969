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


def script_args(doc: str, positional: tuple[str, ...] = ()) -> list[str]:
    """The command line of a benchmark set by environment variables (its
    docstring names them): `-h`/`--help` prints `doc` and exits 0; an option,
    or another count of arguments than `positional` names, exits 2 with the
    usage. (`--help` used to start a training that ignored it, or was read
    as a run folder.) Returns the positional arguments."""
    import sys

    args = sys.argv[1:]
    usage = f"usage: {os.path.basename(sys.argv[0])} {' '.join(positional)}".rstrip()
    if any(arg in ("-h", "--help") for arg in args):
        print(f"{usage}\n\n{doc.strip()}")
        raise SystemExit(0)
    options = [arg for arg in args if arg.startswith("-")]
    if options or len(args) != len(positional):
        what = (
            f"unknown option {options[0]} (settings are environment variables, see --help)"
            if options
            else f"expected {len(positional)} argument(s), received {len(args)}"
        )
        print(f"{usage}\nerror: {what}", file=sys.stderr)
        raise SystemExit(2)
    return args

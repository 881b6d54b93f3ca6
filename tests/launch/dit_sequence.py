"""`python -m tests.launch.dit_sequence COMMANDS.json`: `dit` commands one after another in this one
process, as a user would type them on one machine (`dit train` on one rank), so that a chain of
runs pays the imports (~10 s of CPU per process) once.

COMMANDS.json holds a list of argv lists (without the leading `dit`). Each command's output is
framed by a `@@dit N: ARGV` line and a `@@exit N CODE` line; a command that raises counts as exit 1
and the next one still runs. The process exits with the number of commands that failed.
"""
from __future__ import annotations

import json
import re
import sys
import traceback

BEGIN = "@@dit"
END = "@@exit"


def run(commands: list[list[str]]) -> int:
    from launch.cli import main

    failed = 0
    for i, argv in enumerate(commands):
        print(f"{BEGIN} {i}: {' '.join(argv)}", flush=True)
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001 - reported, and the next command still runs
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        print(f"{END} {i} {code}", flush=True)
        failed += code != 0
    return failed


def sections(output: str) -> list[tuple[int, str]]:
    """(exit code, output) of each command, in order, from the combined output of a run."""
    found = re.findall(rf"^{BEGIN} (\d+): [^\n]*\n(.*?)^{END} \1 (-?\d+)$", output, flags=re.M | re.S)
    return [(int(code), text) for _, text, code in found]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        sys.exit(run(json.load(f)))

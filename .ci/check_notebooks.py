"""Check every notebooks/*.py (jupytext py:percent) matches its committed .ipynb twin.

The .ipynb files exist so Colab can open them from the repository; they are committed
without outputs. Cells (type and source) must be identical to the .py source.
"""

import sys
from pathlib import Path

import jupytext


def cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def main(folder: str) -> int:
    bad = []
    sources = sorted(Path(folder).glob("*.py"))
    for src in sources:
        twin = src.with_suffix(".ipynb")
        if not twin.exists():
            bad.append(f"{twin} is missing: run `jupytext --sync {src}`")
            continue
        nb = jupytext.read(twin)
        if cells(jupytext.read(src)) != cells(nb):
            bad.append(f"{twin} is out of sync with {src}: run `jupytext --sync {src}`")
        if any(c.get("outputs") for c in nb.cells if c.cell_type == "code"):
            bad.append(f"{twin} has outputs committed; clear them")
    for msg in bad:
        print(msg, file=sys.stderr)
    print(f"{len(sources)} notebook sources checked, {len(bad)} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "notebooks"))

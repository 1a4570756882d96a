"""The curvature benchmarks of issue 3 in one run: M-FAC, then HVP/GGN vs a gradient.

* ``benchmarks/mfac.py``: ``mfac_ihvp`` vs the two-pass memory floor (target <= 1.3x),
  ``mfac_update`` vs one pass over the window (<= 1.5x), and the reference PyTorch code
  when torch and a checkout of IST-DASLab/M-FAC are available (target <= 1.0x).
* ``benchmarks/curvature_products.py``: ``hvp`` (<= 3x) and ``ggn`` (<= 2.5x) against one
  gradient of the digits MLP.

Run: ``python benchmarks/curvature.py [--quick] [--mfac-repo PATH]``; each part can also be
run on its own with its full set of options.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import curvature_products  # noqa: E402
import mfac  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small M-FAC window (smoke run)")
    parser.add_argument("--mfac-repo", default=os.environ.get("LINJAX_MFAC_REPO"))
    args = parser.parse_args()
    print("## M-FAC (d x m window, float32)\n", flush=True)
    mfac.main((["--quick"] if args.quick else []) + ["--mfac-repo", args.mfac_repo or ""])
    print("\n## Curvature products on the digits MLP\n", flush=True)
    curvature_products.main(["--repeats", "7"] if args.quick else [])


if __name__ == "__main__":
    main()

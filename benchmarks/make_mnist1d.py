"""Regenerate the MNIST-1D arrays that hesslens ships, and check them against its checksum.

    python benchmarks/make_mnist1d.py                   # generate, compare, write nothing
    python benchmarks/make_mnist1d.py OUT.npz           # ... and write them (if they match)
    python benchmarks/make_mnist1d.py OUT.npz --no-check  # write whatever this generator makes

Exit code 0 when the installed ``mnist1d`` (with this numpy and scipy) makes exactly the shipped
arrays (``hesslens.zoo.bundled.MNIST1D_SHA256``), 2 when it makes others.
"""

from __future__ import annotations

import sys

from hesslens.errors import HesslensInputError
from hesslens.zoo.bundled import regenerate_mnist1d


def main(argv: list[str]) -> int:
    out = next((a for a in argv if not a.startswith("-")), None)
    try:
        info = regenerate_mnist1d(out, check="--no-check" not in argv)
    except HesslensInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    state = "matches" if info["matches"] else "DIFFERS from"
    print(f"generated MNIST-1D: SHA-256 {info['sha256']} {state} the shipped arrays"
          + (f"; wrote {out}" if out else ""))
    return 0 if info["matches"] else 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""``upgd-ref noise``: the standard normals of ``(seed, step)`` at a range of logical indices,
exactly (hex) and in decimal, for checking a port's generator (``specs/noise.md``)."""

from __future__ import annotations

import json

import numpy as np

from ..rng import standard_normals
from .arguments import integer_at_least, unsigned64


def noise_table(seed: int, step: int, start: int, count: int, dtype: str) -> dict:
    """The values and their exact hex forms, with what produced them."""
    values = standard_normals(seed, step, start, count, dtype=np.dtype(dtype))
    return {"seed": seed, "step": step, "start": start, "count": count, "dtype": dtype,
            "index": list(range(start, start + count)),
            "hex": [float(v).hex() for v in values], "value": [float(v) for v in values]}


def run(args) -> int:
    table = noise_table(args.seed, args.step, args.start, args.count, args.dtype)
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print(f"# standard normals of seed {args.seed}, step {args.step}, {args.dtype} "
          f"(specs/noise.md); hex is exact, value is the decimal with 17 significant digits")
    print("index\thex\tvalue")
    for index, exact, value in zip(table["index"], table["hex"], table["value"]):
        print(f"{index}\t{exact}\t{value:.17g}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "noise", help="print the standard normals of (seed, step, index range)",
        description="Print the library's counter-based standard normals (Philox4x32-10, specs/noise.md) "
                    "of one (seed, step) at logical indices start .. start+count-1.")
    parser.add_argument("--seed", type=unsigned64, default=0, help="generator seed, in [0, 2**64) (default 0)")
    parser.add_argument("--step", type=unsigned64, default=1, help="optimizer step, in [0, 2**64) (default 1)")
    parser.add_argument("--start", type=integer_at_least(0), default=0, help="first logical index (default 0)")
    parser.add_argument("--count", type=integer_at_least(1), default=8, help="how many values (default 8)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                        help="precision the normals are produced in (default float64)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (seed, step, start, count, dtype, index, hex, value) instead")
    parser.set_defaults(run=run)

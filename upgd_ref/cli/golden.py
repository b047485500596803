"""``upgd-ref golden {generate,list,compare,verify}``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..backends import BACKENDS, absence_reason, available_backends
from ..trace import read_trace
from ..golden import (
    DEFAULT_DIR,
    MANIFEST,
    TraceError,
    check_manifest,
    compare,
    format_comparison,
    generate,
    load_case,
    load_manifest,
    replay,
    replay_paths,
)


def _cmd_generate(args) -> int:
    manifest = generate(args.out)
    total = sum((Path(args.out) / c["file"]).stat().st_size for c in manifest["cases"])
    for case in manifest["cases"]:
        print(f"{case['name']:<26} {case['sha256'][:16]}  {case['description']}")
    print(f"wrote {len(manifest['cases'])} cases ({total / 1024:.0f} KiB) and {MANIFEST} to {args.out}")
    return 0


def _cmd_list(args) -> int:
    for case in load_manifest(args.golden)["cases"]:
        print(f"{case['name']:<26} {case['layout']['dtype']:<8} {case['steps']:>3} steps  {case['description']}")
    return 0


def _cmd_compare(args) -> int:
    try:
        meta, trace = read_trace(args.trace)
        name = args.case or meta.get("case")
        if not name:
            raise TraceError("the trace names no case: pass --case NAME")
        result = compare(load_case(name, args.golden), trace)
    except (TraceError, KeyError, ValueError, FileNotFoundError) as exc:
        print(f"upgd-ref golden compare: {exc}", file=sys.stderr)
        return 2
    print(format_comparison(result, per_step=args.per_step))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
    return 0 if result.passed else 1


def _cmd_verify(args) -> int:
    problems = check_manifest(args.golden)
    for problem in problems:
        print(f"integrity: {problem}")
    backends = args.backend or available_backends(emulators=True)
    absent = [name for name in backends if absence_reason(name) is not None]
    if absent:
        for name in absent:
            print(f"upgd-ref golden verify: backend {name!r} cannot run here: {absence_reason(name)}", file=sys.stderr)
        return 2
    for entry in load_manifest(args.golden)["cases"]:
        case = load_case(entry["name"], args.golden)
        for backend in backends:
            for fused in replay_paths(case):
                result = compare(case, replay(case, backend, fused=fused))
                worst = max((r.contract for r in result.reports), default=0.0)
                verdict = "ok" if result.passed else "FAIL"
                path = "fused" if fused and case.vgs is not None else "calls"
                print(f"{verdict:<4} {backend:<10} {path:<5} {case.name:<26} worst {worst:.3g} x bound")
                if not result.passed:
                    problems.append(format_comparison(result).splitlines()[-1])
    print("all golden cases verified" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


GOLDEN_HELP = "golden directory (default: the set shipped with the package)"


def register(subparsers) -> None:
    """Add ``upgd-ref golden {generate,list,compare,verify}``; ``--golden`` defaults to the shipped set."""
    parser = subparsers.add_parser("golden", help="golden vectors: generate, list, compare a trace, verify backends")
    sub = parser.add_subparsers(dest="golden_command", required=True)

    gen = sub.add_parser("generate", help="write the golden files (deterministic) from the float64 reference",
                         description="Write every case's trace and manifest.json to --out. Byte-deterministic: "
                                     "regenerating the shipped set reproduces it bit for bit.")
    gen.add_argument("--out", required=True,
                     help=f"directory to write (required; the shipped set lives in {DEFAULT_DIR})")
    gen.set_defaults(run=_cmd_generate)

    listing = sub.add_parser("list", help="list the golden cases")
    listing.add_argument("--golden", default=str(DEFAULT_DIR), help=GOLDEN_HELP)
    listing.set_defaults(run=_cmd_list)

    cmp_ = sub.add_parser("compare", help="check a trace (.npz, specs/golden.md) against a golden case")
    cmp_.add_argument("trace", help="trace file written with upgd_ref.trace.TraceWriter or the documented format")
    cmp_.add_argument("--case", help="golden case name (default: the trace's meta.case)")
    cmp_.add_argument("--golden", default=str(DEFAULT_DIR), help=GOLDEN_HELP)
    cmp_.add_argument("--per-step", action="store_true", help="print every step and field")
    cmp_.add_argument("--json", help="also write the full report as JSON here")
    cmp_.set_defaults(run=_cmd_compare)

    ver = sub.add_parser("verify", help="check manifest hashes and replay every case on every backend")
    ver.add_argument("--golden", default=str(DEFAULT_DIR), help=GOLDEN_HELP)
    ver.add_argument("--backend", action="append", choices=list(BACKENDS.registrations),
                     help="only this backend (repeatable; default: every backend that can run here, "
                          "the CUDA emulator included)")
    ver.set_defaults(run=_cmd_verify)

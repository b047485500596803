"""``upgd-ref info``: versions, the backends that run here and why others do not, Numba's
threads, threading layer and caches (:mod:`upgd_ref.environment`)."""

from __future__ import annotations

import json

from .. import __version__
from ..environment import environment_report


def format_info(report: dict) -> str:
    lines = [f"upgd_ref {__version__}", "", "packages:"]
    for package, version in report["versions"].items():
        lines.append(f"  {package:<18} {version or 'not installed'}")
    lines += ["", "backends:"]
    for b in report["backends"]:
        kind = "test emulator" if b["emulator"] else f"{b['arrays']} arrays"
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        lines.append(f"  {b['name']:<14} {kind:<14} {state}")
    numba = report["numba"]
    lines += ["", "numba:"]
    if numba is None:
        lines.append("  not installed")
    else:
        layer = numba["threading_layer"] or "none loads"
        lines += [
            f"  threads            {numba['threads_in_use']} in use of {numba['threads']} (NUMBA_NUM_THREADS)",
            f"  threading layer    {layer} (configured: {numba['threading_layer_configured']}; "
            f"loadable: {', '.join(numba['threading_layers_loadable']) or 'none'})",
            f"  kernel cache       {numba['cache_dir']}",
        ]
    lines += ["", f"CUDA kernel cache    {report['cuda_kernel_cache_dir']}"]
    return "\n".join(lines)


def run(args) -> int:
    report = environment_report()
    print(json.dumps({"upgd_ref": __version__, **report}, indent=1) if args.json else format_info(report))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info", help="versions, available backends (and why others are not), Numba threads and caches",
        description="Report the installed versions (without importing the frameworks), which backends "
                    "can run here and why the others cannot, Numba's threads, threading layer and "
                    "kernel cache directory.")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(run=run)

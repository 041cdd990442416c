"""``python -m detlayers.bench [family ...] [--json FILE]``: one table, detlayers vs PyTorch.

Every case is timed for our op and, when torch is installed, for its PyTorch counterpart on the
same inputs in the same process; the ratio is ours / PyTorch (below 1.0: detlayers is faster).
A family that fails to load or a case that fails to run is reported in the table and makes the
exit status 1, but the other rows are still measured.
"""

from __future__ import annotations

import argparse
import json
import platform as py_platform
import sys
import traceback
from typing import Any

from detlayers import bench
from detlayers.bench import _block, _torch_sync, load_cases, time_callable


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return py_platform.processor() or py_platform.machine() or "cpu"


def device_names() -> tuple[str, str]:
    """(our device, PyTorch's device) as human-readable names, e.g. ``gpu: NVIDIA H100 x1``."""
    import jax

    devices = jax.devices()
    dev = devices[0]
    if dev.platform == "cpu":
        kind = f"{_cpu_model()} ({len(devices)} XLA host device{'s' * (len(devices) > 1)})"
    else:
        kind = f"{getattr(dev, 'device_kind', dev.platform)} x{len(devices)}"
    ours = f"{dev.platform}: {kind}"
    try:
        import torch
    except ImportError:
        return ours, "torch not installed"
    if torch.cuda.is_available() and dev.platform == "gpu":
        theirs = f"cuda: {torch.cuda.get_device_name(0)}"
    else:
        theirs = f"cpu: {_cpu_model()} ({torch.get_num_threads()} threads)"
    return ours, f"torch {torch.__version__} {theirs}"


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    families_known = bench.FAMILIES  # looked up per call, so tests can plug in a family
    parser = argparse.ArgumentParser(prog="python -m detlayers.bench", description=__doc__)
    parser.add_argument("families", nargs="*", metavar="family",
                        help=f"any of {', '.join(sorted(families_known))} (default: all)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the rows as a JSON list to FILE ('-' for stdout)")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="time budget of each measurement (repeats until spent, at least 5)")
    parser.add_argument("--list", action="store_true", help="list the families and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(sorted(families_known)))
        return 0
    unknown = [f for f in args.families if f not in families_known]
    if unknown:
        parser.error(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {unknown}; "
                     f"known: {sorted(families_known)}")

    import jax

    families = args.families or list(families_known)
    platform = jax.default_backend()
    ours_dev, torch_dev = device_names()
    table = sys.stderr if args.json == "-" else sys.stdout
    print(f"detlayers on {ours_dev} (jax {jax.__version__})\nPyTorch:  {torch_dev}", file=table)
    header = f"{'op':<60} {'detlayers ms':>12} {'pytorch ms':>11} {'ratio':>6}"
    print(header, "-" * len(header), sep="\n", file=table, flush=True)

    rows: list[dict[str, Any]] = []
    failed = False
    for family in families:
        try:
            cases = load_cases([family], platform)
        except Exception as exc:  # one broken family must not hide the others
            failed = True
            print(f"{family + ': failed to load':<60} {type(exc).__name__}: {exc}", file=table)
            traceback.print_exc(file=sys.stderr)
            continue
        for case in cases:
            try:
                repeats = dict(warmup=case.warmup, min_repeats=case.min_repeats, min_seconds=args.min_seconds)
                ours_s = time_callable(case.ours, _block, **repeats)
                torch_s = None
                if case.torch is not None:
                    torch_s = time_callable(case.torch, lambda _: _torch_sync(), **repeats)
                summary = None if case.summary is None else case.summary(ours_s, torch_s)
            except Exception as exc:
                failed = True
                print(f"{case.name:<60} failed: {type(exc).__name__}: {exc}", file=table)
                traceback.print_exc(file=sys.stderr)
                continue
            ours_ms = ours_s * 1e3
            torch_ms = None if torch_s is None else torch_s * 1e3
            ratio = None if torch_s is None else ours_s / torch_s
            print(f"{case.name:<60} {ours_ms:>12.3f} {_fmt(torch_ms, 3):>11} {_fmt(ratio, 2):>6}",
                  file=table, flush=True)
            row = dict(family=case.family, name=case.name, ours_ms=ours_ms, torch_ms=torch_ms,
                       ratio=ratio, device=ours_dev, torch_device=torch_dev,
                       jax_version=jax.__version__)
            if summary is not None:
                row["summary"] = summary
                print("    " + "; ".join(f"{k}: {v}" for k, v in summary.items()), file=table, flush=True)
            rows.append(row)
    if args.json == "-":
        json.dump(rows, sys.stdout, indent=1)
        print()
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {len(rows)} rows to {args.json}", file=table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

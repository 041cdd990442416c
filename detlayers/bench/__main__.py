"""``python -m detlayers.bench [family ...] [--json FILE]``: one table, ours vs PyTorch."""

from __future__ import annotations

import argparse
import json
import platform as py_platform
import sys

from detlayers.bench import FAMILIES, _block, _torch_sync, load_cases, time_callable


def _device_names() -> tuple[str, str]:
    import jax

    dev = jax.devices()[0]
    ours = f"{dev.platform}:{getattr(dev, 'device_kind', '') or py_platform.processor() or 'cpu'}"
    try:
        import torch
    except ImportError:
        return ours, "torch not installed"
    if torch.cuda.is_available() and dev.platform == "gpu":
        theirs = f"cuda:{torch.cuda.get_device_name(0)}"
    else:
        theirs = f"cpu ({torch.get_num_threads()} threads)"
    return ours, f"torch {torch.__version__} {theirs}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detlayers.bench", description=__doc__)
    parser.add_argument("families", nargs="*", help=f"subset of {sorted(FAMILIES)} (default: all)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time budget per measurement")
    args = parser.parse_args(argv)

    import jax

    families = args.families or list(FAMILIES)
    platform = jax.default_backend()
    ours_dev, torch_dev = _device_names()
    print(f"detlayers bench on {ours_dev}; PyTorch: {torch_dev}; jax {jax.__version__}")
    header = f"{'op':<58} {'detlayers ms':>12} {'pytorch ms':>12} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    rows = []
    for case in load_cases(families, platform):
        ours_s = time_callable(case.ours, _block, min_seconds=args.min_seconds)
        torch_s = None
        if case.torch is not None:
            torch_s = time_callable(case.torch, lambda _: _torch_sync(), min_seconds=args.min_seconds)
        ratio = ours_s / torch_s if torch_s else None
        print(
            f"{case.name:<58} {ours_s * 1e3:>12.3f} "
            f"{(torch_s * 1e3 if torch_s else float('nan')):>12.3f} "
            f"{(ratio if ratio else float('nan')):>7.2f}",
            flush=True,
        )
        rows.append(
            dict(family=case.family, name=case.name, ours_ms=ours_s * 1e3,
                 torch_ms=None if torch_s is None else torch_s * 1e3, ratio=ratio,
                 device=ours_dev, torch_device=torch_dev)
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fetch datasets from their canonical URLs with sha256 checks: `python -m model.download mnist --data-root data`."""

from __future__ import annotations

import argparse
import sys

from model.data import DATASETS, default_data_root, download


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m model.download", description=__doc__)
    p.add_argument("datasets", nargs="+", choices=sorted(DATASETS))
    p.add_argument("--data-root", default=None, help="default: $VAE_DATA_ROOT, else ./data")
    p.add_argument("--mirror", action="append", default=None, help="base URL to try instead of the canonical ones")
    a = p.parse_args(argv)
    for name in a.datasets:
        try:
            path = download(name, a.data_root or default_data_root(), tuple(a.mirror) if a.mirror else None)
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"{name}: verified in {path}")


if __name__ == "__main__":
    main()

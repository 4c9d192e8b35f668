"""Measured HBM ceilings of the card (copy: read + written bytes; read: bytes read), for
GB/s comparisons; the implementation is ``experiments.bench.harness.ceilings``.

    PYTHONPATH=. python3 experiments/hbm_ceiling.py [--elements N]     # prints both
"""

from __future__ import annotations

import argparse
import sys

from experiments.bench.harness import ceilings  # noqa: F401  (re-exported)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elements", type=int, default=1 << 29,
                    help="float32 elements of the test array (default 2 GiB)")
    args = ap.parse_args(argv)
    import jax
    copy_bw, read_bw = ceilings(n=args.elements)
    print(f"{jax.devices()[0].device_kind}: HBM copy {copy_bw:.0f} GB/s (read+write), "
          f"read {read_bw:.0f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

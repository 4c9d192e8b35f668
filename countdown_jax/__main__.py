"""The `countdown-jax` console script (and ``python -m countdown_jax``): imports only the
standard library before the command line, so Ctrl-C while jax and the tokenizer stack
load exits 130 with one line, as it does once the command runs (``cli.main``)."""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130


def main(argv=None) -> int:
    try:
        from countdown_jax import cli     # seconds of imports (jax, transformers)
    except KeyboardInterrupt:
        sys.stderr.write("\ncountdown-jax: interrupted\n")
        return EXIT_INTERRUPTED
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())

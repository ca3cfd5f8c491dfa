"""The ``cleihc`` command: parses arguments, calls the library, reports.

Each subcommand lives in its own module ``cleihc.cli.<name>`` exposing ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace, returning an exit status). No numerics here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cleihc import __version__
from cleihc.errors import CleihcError, ProtocolError

# Subcommand modules, in the order `cleihc --help` lists them.
COMMANDS = ("info", "quantify", "tables", "report", "validate", "protocols", "stains")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cleihc",
        description="Quantify IHC and histochemistry in whole-slide images of skin biopsies.",
    )
    parser.add_argument("--version", action="version", version=f"cleihc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"cleihc.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cleihc`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on usage errors
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # The console shows `level` and above, whatever other handlers (run.log) ask of the cleihc logger.
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    if args.verbose < 2:
        # Readers log decode problems that cleihc reports itself as one-line errors.
        for name in ("tifffile", "openslide", "distributed", "numba"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except ProtocolError as exc:  # the user's protocol file or name: a usage error in every command
        print(f"cleihc {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CleihcError as exc:
        print(f"cleihc {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"cleihc {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cleihc protocols | head`: the reader left, nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:  # a file cleihc cannot write or read (a bad --out, a full disk): one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"cleihc {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

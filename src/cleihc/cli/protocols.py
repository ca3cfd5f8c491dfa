"""``cleihc protocols [list | show NAME]``: the protocols cleihc can find, and one of them in full."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cleihc.protocol import ProtocolInfo

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``protocols`` subcommand."""
    p = subparsers.add_parser(
        "protocols",
        help="list the protocols (built-in, ./protocols, $CLEIHC_PROTOCOL_PATH) or show one in full",
        description="Without arguments (or with 'list'): every protocol found, by the name that selects it (its "
        "file name), with its version, description, file, where it comes from, its [protocol] name when that "
        "differs and the files of the same name it hides. 'show NAME' prints one protocol fully resolved (every "
        "default explicit) as TOML, with its sha256. Search order for a name: $CLEIHC_PROTOCOL_PATH folders, "
        "./protocols, the built-ins.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    ls = sub.add_parser("list", help="list the protocols found (the default)")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    show = sub.add_parser("show", help="print one protocol fully resolved as TOML, with its sha256")
    show.add_argument("name", metavar="NAME", help="protocol name or .toml file")
    show.add_argument("--json", action="store_true", help="print the resolved protocol as JSON instead")
    p.set_defaults(func=run, action=None, json=False)


def _describe_origin(info: ProtocolInfo) -> str:
    """Where a listed protocol comes from, its [protocol] name if different, and what it hides, in one line."""
    notes = [f"{info.origin}: {info.path}"]
    if info.protocol_name:
        notes.append(f"[protocol] name = {info.protocol_name!r} (names its results folder and table rows)")
    if info.shadows:
        hidden = [
            f"the built-in {info.name}" if origin == "built-in" else f"{origin}: {path}"
            for path, origin in info.shadows
        ]
        notes.append("shadows " + ", ".join(hidden))
    return "; ".join(notes)


def run(args: argparse.Namespace) -> int:
    """List the protocols or show one; exit 0, or 2 (a usage error, as in ``quantify``) for a bad protocol."""
    from cleihc.cli import EXIT_USAGE
    from cleihc.errors import CleihcError
    from cleihc.protocol import list_protocols, load_protocol, protocol_search_path

    if args.action == "show":
        try:
            proto = load_protocol(args.name)
        except CleihcError as exc:
            # The NAME argument is what is wrong: exit 2 as `cleihc quantify --protocol` does for the same file.
            print(f"cleihc protocols: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if args.json:
            print(json.dumps({"sha256": proto.sha256, "source": proto.source, **proto.to_dict()}, indent=2))
        else:
            print(f"# source: {proto.source}")
            print(proto.to_toml(), end="")
        return 0
    infos = list_protocols()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": i.name,
                        "protocol_name": i.protocol_name or i.name,
                        "version": i.version,
                        "description": i.description,
                        "path": str(i.path),
                        "origin": i.origin,
                        "shadows": [{"path": str(p), "origin": o} for p, o in i.shadows],
                    }
                    for i in infos
                ],
                indent=2,
            )
        )
        return 0
    if not infos:
        print("no protocols found")
    else:
        wn = max(len(i.name) for i in infos)
        wv = max(len(i.version) for i in infos)
        for i in infos:
            print(f"{i.name:<{wn}}  {i.version:<{wv}}  {i.description}")
            print(f"{'':<{wn}}  {'':<{wv}}  {_describe_origin(i)}")
    print("search path: " + ", ".join(str(p) for p in protocol_search_path()))
    return 0

"""``cleihc protocols [list | show NAME]``: the protocols cleihc can find, and one of them in full."""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``protocols`` subcommand."""
    p = subparsers.add_parser(
        "protocols",
        help="list the protocols (built-in, ./protocols, $CLEIHC_PROTOCOL_PATH) or show one in full",
        description="Without arguments (or with 'list'): every protocol found, by name, with its version, "
        "description and file. 'show NAME' prints one protocol fully resolved (every default explicit) as TOML, "
        "with its sha256. Search order for a name: $CLEIHC_PROTOCOL_PATH folders, ./protocols, the built-ins.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    ls = sub.add_parser("list", help="list the protocols found (the default)")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    show = sub.add_parser("show", help="print one protocol fully resolved as TOML, with its sha256")
    show.add_argument("name", metavar="NAME", help="protocol name or .toml file")
    show.add_argument("--json", action="store_true", help="print the resolved protocol as JSON instead")
    p.set_defaults(func=run, action=None, json=False)


def run(args: argparse.Namespace) -> int:
    """List the protocols or show one; exit 0, or 1 (via CleihcError) when a protocol is missing or invalid."""
    from cleihc.protocol import list_protocols, load_protocol, protocol_search_path

    if args.action == "show":
        proto = load_protocol(args.name)
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
                    {"name": i.name, "version": i.version, "description": i.description, "path": str(i.path)}
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
            print(f"{'':<{wn}}  {'':<{wv}}  {i.path}")
    print("search path: " + ", ".join(str(p) for p in protocol_search_path()))
    return 0

"""`python -m pipeline.store info|verify|merge`: look into, check and consolidate activation stores.

    python -m pipeline.store info runs/demo [--json]
    python -m pipeline.store verify s3://bucket/big/activations
    python -m pipeline.store merge runs/big runs/big-merged/activations --order windows

A path is a run directory or a store root, local or an fsspec URL; a URL's storage options come
from --storage-options (JSON) or $DIALBOX_STORAGE_OPTIONS. Bad input is one line on stderr and
exit code 2; verify exits 1 when it finds damage, naming each damaged row range.
"""


from __future__ import annotations

import argparse
import json
import sys

from activations.store import ActivationStore, StoreError, merge, verify
from activations.store.blocks import ORDERS
from activations.store.info import describe, format_info
from pipeline.cli import one_line_errors


def _options(text: str | None, flag: str) -> dict | None:
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        options = err
    if not isinstance(options, dict):
        raise StoreError(f"{flag} is not a JSON object ({options}): give one such as "
                         '\'{"endpoint_url": "http://host:9000"}\'')
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage-options", metavar="JSON",
                        help="fsspec options for URLs (default: $DIALBOX_STORAGE_OPTIONS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="sites, tokens, shards, bytes and identity of a store")
    info.add_argument("path", help="run directory or store root (local path or URL)")
    info.add_argument("--json", action="store_true", help="print JSON")
    check = sub.add_parser("verify", help="read every committed chunk and check the store's invariants")
    check.add_argument("path", help="run directory or store root (local path or URL)")
    m = sub.add_parser("merge", aliases=["consolidate"], help="copy every shard's committed rows into a new one-shard store")
    m.add_argument("src", help="run directory or store root of a finished store")
    m.add_argument("dst", help="root of the new store, e.g. runs/<name>/activations")
    m.add_argument("--order", choices=ORDERS, default="ranks",
                   help="ranks: as the reader yields them; windows: as one writer would have stored them")
    m.add_argument("--dst-storage-options", metavar="JSON", help="fsspec options for dst (default: --storage-options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with one_line_errors(f"store {args.command}"):
        options = _options(args.storage_options, "--storage-options")
        progress = not args.no_progress
        if args.command == "info":
            d = describe(ActivationStore(args.path, options))
            print(json.dumps(d, indent=2) if args.json else format_info(d))
        elif args.command == "verify":
            result = verify(args.path, options, progress)
            for line in result.problems:
                print(line)
            print(result.summary)
            return 0 if result.ok else 1
        else:
            dst_options = _options(args.dst_storage_options, "--dst-storage-options") or options
            merged = merge(args.src, args.dst, args.order, options, dst_options, progress)
            print(f"merge: {merged.n_tokens} tokens from {args.src} in {args.order} order into {merged.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m jaxkd.export verify DIR``: checks an artifact's files against its manifest.

Exits 1 with one line naming the file whose bytes do not match the manifest, or that is
missing.
"""

from __future__ import annotations

import argparse
import sys

from jaxkd.export.artifact import MANIFEST, artifact_bytes, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxkd.export",
                                     description="Checks an exported jaxkd artifact.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check every file against manifest.json (sha256)")
    check.add_argument("directory")
    args = parser.parse_args(argv)
    try:
        manifest = verify(args.directory)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.directory}: {len(manifest['files'])} files match {MANIFEST} "
          f"({artifact_bytes(args.directory)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

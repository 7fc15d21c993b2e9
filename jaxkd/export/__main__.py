"""``python -m jaxkd.export``: check, sign and trace exported artifacts.

    python -m jaxkd.export verify DIR [--public-key PUB] [--require-signature]
    python -m jaxkd.export keygen --out KEY            # KEY (private) and KEY.pub
    python -m jaxkd.export sign DIR --key KEY
    python -m jaxkd.export lineage DIR

``verify`` checks every file against ``manifest.json`` (size and sha256) and, when the
artifact is signed or a public key is given, the Ed25519 signature of the manifest
(:mod:`jaxkd.export.signing`); it exits 1 with one line naming what does not match.
``lineage`` prints the runs the model descends from (:mod:`jaxkd.export.lineage`).
"""

from __future__ import annotations

import argparse
import sys

from jaxkd.export.artifact import MANIFEST, artifact_bytes
from jaxkd.schema import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxkd.export",
                                     description="Checks, signs and traces jaxkd artifacts.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check every file against manifest.json (sha256) "
                                          "and the signature")
    check.add_argument("directory")
    check.add_argument("--public-key", default=None,
                       help="PEM public key the artifact must be signed with")
    check.add_argument("--require-signature", action="store_true",
                       help="refuse an unsigned artifact")
    keygen = sub.add_parser("keygen", help="write a new Ed25519 key pair (PEM)")
    keygen.add_argument("--out", required=True, help="private key path; the public key is "
                                                     "OUT.pub")
    sign = sub.add_parser("sign", help="sign the manifest with an Ed25519 private key")
    sign.add_argument("directory")
    sign.add_argument("--key", required=True, help="PEM private key")
    lineage = sub.add_parser("lineage", help="print the runs the model descends from")
    lineage.add_argument("directory")
    args = parser.parse_args(argv)
    from jaxkd.export import lineage as lineage_module
    from jaxkd.export import signing

    try:
        if args.command == "verify":
            manifest = signing.verify_signed(args.directory, args.public_key,
                                             require=args.require_signature)
            signed = signing.is_signed(args.directory)
            print(f"{args.directory}: {len(manifest['files'])} files match {MANIFEST} "
                  f"({artifact_bytes(args.directory)} bytes)"
                  + ("; signature valid" if signed else "; not signed"))
        elif args.command == "keygen":
            private, public = signing.keygen(args.out)
            print(f"wrote {private} (private) and {public} (public)")
        elif args.command == "sign":
            record = signing.sign(args.directory, args.key)
            print(f"signed {args.directory}/{MANIFEST} (sha256 "
                  f"{record['manifest_sha256'][:16]}...) with public key "
                  f"{record['public_key'][:16]}...")
        else:
            print("\n".join(lineage_module.chain(args.directory)))
    except (OSError, ValueError, ConfigError) as e:
        print(f"jaxkd: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

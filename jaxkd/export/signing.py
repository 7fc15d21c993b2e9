"""Signed artifacts: an Ed25519 signature over the manifest, which pins every file.

An artifact's ``manifest.json`` lists the size and sha256 of each of its files (and its
lineage, :mod:`jaxkd.export.lineage`), so signing the manifest's bytes signs the model:
Ed25519 (Bernstein et al. 2012, RFC 8032) through the ``cryptography`` package. ``sign``
writes ``signature.json`` beside the manifest::

    {"algorithm": "ed25519", "public_key": <32 bytes, hex>,
     "manifest_sha256": <hex>, "signature": <64 bytes, hex>}

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), the format of
``openssl genpkey -algorithm ed25519`` and ``python -m jaxkd.export keygen``. ``verify``
refuses, in one line naming the reason: a file that differs from the manifest, a manifest
that differs from what was signed, a signature made with another key, or, when a public key
is required, an unsigned artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from jaxkd import files
from jaxkd.export.artifact import MANIFEST, verify
from jaxkd.export.encoding import ArtifactError
from jaxkd.schema import ConfigError, MissingError

SIGNATURE = "signature.json"


def keygen(private_path: str) -> tuple[str, str]:
    """Writes a new Ed25519 key pair: ``private_path`` (PEM, mode 0600) and
    ``private_path + '.pub'``; returns both paths."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    for path, data, mode in ((private_path, private, 0o600), (private_path + ".pub", public,
                                                              0o644)):
        if os.path.exists(path):
            raise ConfigError(f"{path} exists: keygen never overwrites a key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return private_path, private_path + ".pub"


def _read_key(path: str, *, private: bool) -> Any:
    if not os.path.isfile(path):
        raise MissingError(f"{path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        kind = "private" if private else "public"
        raise ConfigError(f"{path} is not a PEM {kind} key ({e})") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise ConfigError(f"{path} is a {type(key).__name__}, not an Ed25519 key")
    return key


def _raw_public(key: ed25519.Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign(directory: str, key_path: str) -> dict[str, str]:
    """Signs ``directory``'s manifest (after checking every file against it) with the
    private key in ``key_path``; writes and returns ``signature.json``'s contents."""
    verify(directory)
    key = _read_key(key_path, private=True)
    with open(os.path.join(directory, MANIFEST), "rb") as f:
        manifest = f.read()
    signature = {"algorithm": "ed25519", "public_key": _raw_public(key.public_key()),
                 "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                 "signature": key.sign(manifest).hex()}
    files.write_json(os.path.join(directory, SIGNATURE), signature)
    return signature


def is_signed(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, SIGNATURE))


def verify_signed(directory: str, public_key_path: str | None = None, *,
                  require: bool = False) -> dict[str, Any]:
    """The manifest of ``directory`` once every file matches it and, if the artifact is
    signed (or ``require``, or a key is given), the signature matches the manifest and was
    made with ``public_key_path``'s key.

    Raises (one line each): ``ArtifactError`` for a changed file, a changed manifest or a
    wrong key; ``MissingError`` for a missing file or, when required, a missing signature.
    """
    manifest = verify(directory)
    path = os.path.join(directory, SIGNATURE)
    if not os.path.exists(path):
        if require or public_key_path:
            raise MissingError(f"{directory} is not signed (no {SIGNATURE}) but a signed "
                               "artifact is required")
        return manifest
    try:
        with open(path) as f:
            record = json.load(f)
        signature = bytes.fromhex(record["signature"])
        signer = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(record["public_key"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path} is not a jaxkd signature ({type(e).__name__}: {e})"
                            ) from None
    if public_key_path:
        expected = _read_key(public_key_path, private=False)
        if _raw_public(expected) != record["public_key"]:
            raise ArtifactError(f"{path} was made with another key (public key "
                                f"{record['public_key'][:16]}...), not {public_key_path}'s "
                                f"({_raw_public(expected)[:16]}...)")
    with open(os.path.join(directory, MANIFEST), "rb") as f:
        data = f.read()
    try:
        signer.verify(signature, data)
    except InvalidSignature:
        raise ArtifactError(f"{os.path.join(directory, MANIFEST)} does not match its signature "
                            f"in {path}: the manifest changed after signing") from None
    return manifest

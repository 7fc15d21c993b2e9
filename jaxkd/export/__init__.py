"""A compressed-model artifact that loads without executing code and runs integer matmuls.

One concept per module:

- :mod:`~jaxkd.export.encoding`: how one tensor is stored (dense / bitmask / CSR positions
  times raw / codebook values, the smallest chosen by exact byte counts);
- :mod:`~jaxkd.export.artifact`: the directory (``manifest.json`` and two tensor files):
  ``export``, ``verify``, ``load``, ``storage_report``;
- :mod:`~jaxkd.export.integer`: the integer runtime (int8 x int8 -> int32 layers);
- ``python -m jaxkd.export verify DIR`` (:mod:`jaxkd.export.__main__`).
"""

from jaxkd.export.artifact import (
    CODECS,
    FLOAT_FILE,
    FORMAT,
    INT_FILE,
    MANIFEST,
    artifact_bytes,
    export,
    integer_kernels,
    load,
    read_lineage,
    read_manifest,
    read_tensor,
    storage_report,
    verify,
)
from jaxkd.export.encoding import (
    ENCODINGS,
    POSITIONS,
    VALUE_CODINGS,
    ArtifactError,
    check_encodings,
    choose_encoding,
    decode,
    encode,
    encoded_nbytes,
    index_dtype,
    raw_nbytes,
)
from jaxkd.export.integer import integer_apply, integer_layer

__all__ = [
    "CODECS", "ENCODINGS", "FLOAT_FILE", "FORMAT", "INT_FILE", "MANIFEST", "POSITIONS",
    "VALUE_CODINGS", "ArtifactError", "artifact_bytes", "check_encodings", "choose_encoding",
    "decode", "encode", "encoded_nbytes", "export", "index_dtype", "integer_apply",
    "integer_kernels", "integer_layer", "load", "raw_nbytes", "read_lineage", "read_manifest",
    "read_tensor", "storage_report", "verify",
]

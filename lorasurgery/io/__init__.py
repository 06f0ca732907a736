"""Streaming safetensors I/O: header-first reading, lazy tensor sources, the atomic streaming writer,
hashes and output metadata."""
from __future__ import annotations

from .dtypes import ST_TO_TORCH, TORCH_TO_ST, USER_DTYPES, dtype_name, itemsize, parse_dtype
from .hashes import sha256_file, sshs_legacy_hash, sshs_legacy_hash_file, sshs_model_hash
from .metadata import canonical_json, lora_metadata, parse_arch, provenance, title_of
from .reader import Header, TensorInfo, TensorSource, check_not_pickle, open_source, read_header
from .writer import StreamingWriter, TensorSpec, encode_header, safetensors_order, write_file

__all__ = [
    "ST_TO_TORCH", "TORCH_TO_ST", "USER_DTYPES", "dtype_name", "itemsize", "parse_dtype",
    "sha256_file", "sshs_legacy_hash", "sshs_legacy_hash_file", "sshs_model_hash",
    "canonical_json", "lora_metadata", "parse_arch", "provenance", "title_of",
    "Header", "TensorInfo", "TensorSource", "check_not_pickle", "open_source", "read_header",
    "StreamingWriter", "TensorSpec", "encode_header", "safetensors_order", "write_file",
]

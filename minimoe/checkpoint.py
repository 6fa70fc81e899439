"""Checkpoints: one file of named arrays plus JSON metadata, written atomically and checksummed.

Layout: the magic line, the SHA-256 of the payload in hex and a newline, then the payload (an
uncompressed .npz archive whose entry `__meta__` holds the JSON). Saving writes a temporary file in
the same directory, flushes it to disk and renames it over the target, so a crash mid-save leaves the
previous checkpoint whole; loading verifies the checksum before it trusts a byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"MINIMOE-CHECKPOINT-1\n"
META_KEY = "__meta__"


class CheckpointError(Exception):
    """A missing, truncated or corrupted checkpoint (a user-facing, one-line error)."""


def save_checkpoint(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    meta_bytes = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(buffer, **arrays, **{META_KEY: meta_bytes})
    payload = buffer.getvalue()
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            file.write(MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n")
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) of a checkpoint whose checksum matches; CheckpointError otherwise."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file") from None
    header_length = len(MAGIC) + 64 + 1
    if not raw.startswith(MAGIC) or len(raw) < header_length:
        raise CheckpointError(f"{path} is not a minimoe checkpoint (no {MAGIC.strip().decode()} header)")
    expected = raw[len(MAGIC):header_length - 1].decode("ascii", errors="replace")
    payload = raw[header_length:]
    if hashlib.sha256(payload).hexdigest() != expected:
        raise CheckpointError(f"checkpoint {path} is corrupted: its SHA-256 does not match the one it was "
                              f"saved with (truncated or modified file)")
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays.pop(META_KEY).tobytes().decode("utf-8"))
    return arrays, meta

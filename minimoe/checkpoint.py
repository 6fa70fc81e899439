"""Checkpoints: named arrays plus JSON metadata, written atomically and checksummed.

File layout: the magic line, the SHA-256 of the payload in hex and a newline, then the payload (an
uncompressed .npz archive whose entry `__meta__` holds the JSON). Saving writes a temporary file in
the same directory, flushes it to disk and renames it over the target, so a crash mid-save leaves the
previous checkpoint whole; loading verifies the checksum before it trusts a byte.

Expert parallelism: the ranks of one expert-parallel group each hold a slice of every expert array
(axis 0 is the expert). Each writes its slice to a part file named after the step and its place,
`checkpoint.bin.step<S>.part<i>-of-<n>`; once all parts are on disk, one rank writes the manifest,
`checkpoint.bin` itself, with the dense arrays and the names of its parts. The manifest is renamed
into place last, so until it lands the previous manifest still names the previous, whole set of parts;
a half-written save is never mistaken for a whole one. Loading joins the parts back into arrays of
every expert in global order, whatever ep_size wrote them, so any other ep_size can take its slice.
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


def save_checkpoint(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                    parts: list[str] | None = None) -> None:
    """Write the checkpoint (the manifest, when `parts` names expert part files already written by
    save_part); then remove the part files of earlier saves, which no manifest names any more."""
    path = Path(path)
    _write(path, arrays, {**meta, "parts": parts} if parts else meta)
    for stale in path.parent.glob(f"{path.name}.step*.part*"):
        if stale.name not in (parts or []):
            stale.unlink(missing_ok=True)


def part_path(path: str | Path, step: int, part: int, parts: int) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.step{step}.part{part}-of-{parts}")


def save_part(path: str | Path, step: int, part: int, parts: int, arrays: dict[str, np.ndarray]) -> None:
    """Write expert slice `part` of `parts` for the checkpoint of `step` at `path`."""
    _write(part_path(path, step, part, parts), arrays, {"step": step, "part": part, "parts": parts})


def _write(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    meta_bytes = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(buffer, **arrays, **{META_KEY: meta_bytes})
    payload = buffer.getvalue()
    write_atomically(path, [MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n", payload])


def write_atomically(path: Path, chunks: list[bytes]) -> None:
    """Write `chunks` to a temporary file beside `path` (named .<name>.tmp-<pid>), flush it to disk and
    rename it over `path`: a crash at any moment leaves either the old file or the new one, whole."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            for chunk in chunks:
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) of a checkpoint whose checksums match, its expert parts joined in global expert
    order; CheckpointError otherwise."""
    path = Path(path)
    arrays, meta = _read(path)
    parts = [_read(path.with_name(name)) for name in meta.get("parts", [])]
    for index, (_, part_meta) in enumerate(parts):
        if (part_meta["step"], part_meta["part"], part_meta["parts"]) != (meta["step"], index, len(parts)):
            raise CheckpointError(f"checkpoint {path}: part {meta['parts'][index]} belongs to step "
                                  f"{part_meta['step']}, part {part_meta['part']} of {part_meta['parts']}")
    for name in parts[0][0] if parts else []:
        arrays[name] = np.concatenate([part[name] for part, _ in parts])
    return arrays, meta


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
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

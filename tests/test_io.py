"""File utilities: content hashes remembered per file identity, never stale."""

from __future__ import annotations

import hashlib
import os

from cleihc import io


def test_sha256_file_is_the_content_hash_and_follows_every_rewrite(tmp_path, monkeypatch):
    path = tmp_path / "slide.bin"
    path.write_bytes(b"a" * 3_000_001)
    want = hashlib.sha256(b"a" * 3_000_001).hexdigest()
    assert io.sha256_file(path) == want

    reads = []
    real_open = open
    monkeypatch.setattr(io, "open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k), raising=False)
    assert io.sha256_file(path) == want and reads == []  # the same file: not read again

    # Same size, new content, the modification time forced back to the old one's: a new inode still tells.
    st = path.stat()
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"b" * 3_000_001)
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, path)
    assert io.sha256_file(path) == hashlib.sha256(b"b" * 3_000_001).hexdigest()
    # Rewritten in place (same inode, same size): the modification time tells.
    with real_open(path, "r+b") as fh:
        fh.write(b"c")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert io.sha256_file(path) == hashlib.sha256(b"c" + b"b" * 3_000_000).hexdigest()
    assert len(reads) == 2

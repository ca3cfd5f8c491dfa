"""Small file utilities: atomic writes, content hashes, and reading the CSV files users make."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pandas is imported only when used: Dask workers import this module without it
    import pandas as pd

__all__ = ["atomic_path", "atomic_write", "jsonable", "read_user_csv", "sha256_file"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path` in one step.

    A crash (even ``kill -9``) leaves either the old file or the new one, never a partial file, because the
    rename is atomic on POSIX file systems. The temporary file is removed on error.

    Examples
    --------
    >>> with atomic_write("out.csv", mode="w") as f:  # doctest: +SKIP
    ...     f.write("a,b\\n")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path` for writers that want a file name; renamed onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks.

    Remembered per file identity (device, inode, size, modification time in ns) within the process: a batch
    hashes each slide to decide whether to skip it, and its provenance record needs the same digest (a whole
    slide file is read once, not twice). A file rewritten in any way gets a new identity and is hashed again.
    """
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                h.update(chunk)
        digest = h.hexdigest()
        if len(_DIGESTS) >= _MAX_DIGESTS:
            _DIGESTS.pop(next(iter(_DIGESTS)))  # the oldest
        _DIGESTS[key] = digest
    return digest


# Digests of files already hashed by this process, by file identity (insertion order = age).
_DIGESTS: dict[tuple[int, int, int, int], str] = {}
_MAX_DIGESTS = 4096


def jsonable(obj: Any) -> Any:
    """`obj` with numpy scalars and arrays made plain, NaN and infinities made None (JSON has neither), paths str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_user_csv(path: str | os.PathLike[str], **kwargs: Any) -> pd.DataFrame:
    """A CSV a user made, as a pandas DataFrame, however their spreadsheet saved it.

    Excel's "CSV UTF-8" starts with a byte-order mark (pandas drops it); in locales with a decimal comma it
    separates fields with semicolons, and "text" exports use tabs. A file whose header reads as one column
    holding ``;`` (then with decimal commas) or a tab is read again with that separator. `kwargs` go to
    :func:`pandas.read_csv`; its errors propagate.
    """
    import pandas as pd

    df = pd.read_csv(path, **kwargs)
    if len(df.columns) == 1:
        header = str(df.columns[0])
        if ";" in header:
            return pd.read_csv(path, **{"decimal": ",", **kwargs, "sep": ";"})
        if "\t" in header:
            return pd.read_csv(path, **{**kwargs, "sep": "\t"})
    return df

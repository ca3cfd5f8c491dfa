"""One error hierarchy for everything a user can get wrong.

Every error is a :class:`CleihcError` and also the builtin it resembles, so callers may catch either. The message
is one line that names the file (or key) and says how to fix it; the CLI prints ``str(error)`` and never a
traceback.
"""

from __future__ import annotations

from os import PathLike

__all__ = [
    "CleihcError",
    "CorruptSlideError",
    "MissingMppError",
    "NoTissueError",
    "NotBrightfieldError",
    "ProtocolError",
    "RegionsError",
    "ResultsFolderError",
    "SlideError",
    "SlideNotFoundError",
    "SlidePermissionError",
    "StainDriftError",
    "UnsupportedFormatError",
]


class CleihcError(Exception):
    """Base of all cleihc errors: a one-line, user-facing message.

    Parameters
    ----------
    message : str
        What is wrong and how to fix it, in one line.
    path : str or PathLike, optional
        The file concerned; when given, the message is prefixed with it.
    """

    def __init__(self, message: str, *, path: str | PathLike[str] | None = None):
        self.path = None if path is None else str(path)
        self.reason = " ".join(str(message).split())  # one line, always
        super().__init__(f"{self.path}: {self.reason}" if self.path else self.reason)


class SlideError(CleihcError):
    """A slide cannot be opened or read."""


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The path does not exist or is not a regular file."""


class SlidePermissionError(SlideError, PermissionError):
    """The file exists but cannot be read by this user."""


class UnsupportedFormatError(SlideError, ValueError):
    """No backend recognises the file as a slide or image."""


class NotBrightfieldError(UnsupportedFormatError):
    """The image is not 8-bit RGB brightfield (fluorescence, multi-channel, 16-bit, ...)."""


class CorruptSlideError(SlideError, ValueError):
    """The file is recognised but truncated or its tile data cannot be decoded."""


class MissingMppError(CleihcError, ValueError):
    """Physical units are needed but the slide has no microns-per-pixel and none was given."""


class ProtocolError(CleihcError, ValueError):
    """A protocol file is missing, malformed or has an invalid value."""


class RegionsError(CleihcError, ValueError):
    """An annotation (regions) file is missing, malformed or hostile."""


class ResultsFolderError(CleihcError, ValueError):
    """A results folder holds another protocol's results: measuring into it would overwrite them."""


class NoTissueError(CleihcError, ValueError):
    """Tissue detection found no tissue on the slide."""


class StainDriftError(CleihcError, ValueError):
    """Estimated stain vectors differ from the protocol's reference beyond its tolerance."""

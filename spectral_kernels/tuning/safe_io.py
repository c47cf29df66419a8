"""Writing files so that a crash cannot leave half of one, and checksums to tell when one changed.

:func:`atomic_write` writes a file aside (a temporary name in the same folder), flushes it to the
disk (fsync), then renames it over the target with ``os.replace`` — atomic on POSIX and Windows
within one file system — and fsyncs the folder so the rename itself survives a power loss. A
process killed at any point leaves either the previous file or the new one, never a mix; what it
can leave is a temporary file (named with :data:`TEMP_MARK`), which readers ignore and a later
save of the folder removes once it is stale (:data:`STALE_AFTER_S`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from typing import Callable, Iterator

from torch import Tensor

from spectral_kernels._hashing import update_with_bytes

#: part of the name of every temporary file written aside (``.<name>.sk-tmp-<token>``)
TEMP_MARK = ".sk-tmp-"


class AdapterFileError(ValueError):
    """An adapter file or folder is damaged, edited or inconsistent: a checksum, a dtype or a
    value that is not what was saved, or files of a folder that do not belong together."""


def temp_name(path: str, token: str | None = None) -> str:
    """A temporary name beside ``path`` (same folder, so the final rename does not cross file systems)."""
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}{TEMP_MARK}{token or secrets.token_hex(6)}")


def fsync_dir(directory: str) -> None:
    """Flush a folder's entries (renames, new files) to the disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:  # Windows: folders cannot be opened; NTFS journals the rename
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_aside(path: str, write: Callable[[str], None], token: str | None = None) -> str:
    """Run ``write(tmp)`` for a temporary name beside ``path``, fsync the file, and return that name
    (the caller renames it into place). The temporary file is removed if ``write`` raises."""
    tmp = temp_name(path, token)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` with ``write(name)`` under a temporary name, then rename it into place (module
    docstring): ``path`` holds the old content or the new, whatever happens in between."""
    path = os.fspath(path)
    tmp = write_aside(path, write)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


#: a temporary file older than this (seconds) is left over from an interrupted save; a younger one
#: may belong to a save in flight in another process (every rank of a job saving one folder)
STALE_AFTER_S = 3600.0


def remove_temporaries(directory: str) -> None:
    """Delete the temporary files that interrupted saves left in ``directory`` (those older than
    :data:`STALE_AFTER_S`)."""
    now = time.time()
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                if TEMP_MARK in name and now - os.path.getmtime(path) > STALE_AFTER_S:
                    os.remove(path)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (C order): equal exactly when the tensor is."""
    h = hashlib.sha256(repr((str(t.dtype).removeprefix("torch."), list(t.shape))).encode())
    update_with_bytes(h, t)
    return h.hexdigest()


@contextlib.contextmanager
def reading(path: str, what: str) -> Iterator[None]:
    """Turn the errors a damaged file raises while it is read (bad JSON, a truncated safetensors or
    pickle) into an :class:`AdapterFileError` naming the file."""
    try:
        yield
    except (FileNotFoundError, AdapterFileError):
        raise
    except Exception as exc:  # safetensors, json and torch.load raise many types for a damaged file
        raise AdapterFileError(f"{path}: cannot read this {what} ({type(exc).__name__}: {exc}); the file is "
                               "damaged or incomplete (an interrupted save, a partial copy?)") from exc

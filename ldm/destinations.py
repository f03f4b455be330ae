"""Where commands write: each destination checked before the work starts, and the machine's write errors as one line.

A command that trains, encodes or samples for minutes and only then finds that it cannot write its
result has wasted those minutes, so `check_writable` runs first for every folder a command will
write (the artifact store, a run folder, an --out folder). A disk can still fill, or fail, during the
work: `writing_to` turns that error (an OSError, or safetensors' SafetensorError wrapping one) into a
`WriteError` naming the folder and what to do. `STORE_OPTION` names the option that moves the store.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

if TYPE_CHECKING:  # the store imports this module
    from ldm.artifacts import ArtifactStore

STORE_OPTION = "--store / LDM_HOME"
# The write errors a user can act on, by what to do about them.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}
_IN_THE_WAY = {errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}
_FAILING = {errno.EIO}
# safetensors' Rust errors carry the OS error in their text: "... (os error 28) at path ..."
# (or "code: 28" in older ones).
_SAFETENSORS_ERRNO = re.compile(r"os error (\d+)|code: (\d+)")
_SAFETENSORS_PATH = re.compile(r'at path "([^"]+)"')


class WriteError(RuntimeError):
    """A destination that cannot be written: a file in its way, no permission, a read-only, full or failing disk."""


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Raise WriteError unless `path` is a folder, or can be created as one, in which a new file can be made.

    `option` is what moves the destination elsewhere (`--out`, `--run-dir`, STORE_OPTION). Nothing is
    created: the check makes and removes one empty file in the nearest folder that exists.
    """
    path = Path(path)
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" at the latest
    except OSError as err:  # a folder on the way that this user may not look into
        raise WriteError(_message(path, err.errno, option)) from None
    if not existing.is_dir():
        raise WriteError(
            f"cannot write to {path}: {existing} is a file, not a folder; pass a folder path (it is created "
            f"when missing) with {option}"
        )
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".ldm-write-check-")
    except OSError as err:
        raise WriteError(_message(path, err.errno, option)) from None
    os.close(handle)
    os.unlink(probe)


def check_run_writable(store: ArtifactStore, run_dir: str | os.PathLike) -> None:
    """Raise WriteError unless a training run can write its run folder and then its artifact into `store`."""
    check_writable(run_dir, "--run-dir")
    store.check_writable()


@contextmanager
def writing_to(folder: str | os.PathLike, option: str, kept: str = "") -> Iterator[None]:
    """Run the block, turning a write error of `folder` into a WriteError that names it, what to do and `kept`
    (what stays of the partial output). Errors about files elsewhere (the data being read) pass unchanged."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        code, path = disk_error(err)
        if code is None or (path is not None and not _inside(path, Path(folder))):
            raise
        raise WriteError(_message(Path(folder), code, option) + (f"; {kept}" if kept else "")) from err


def disk_error(err: BaseException) -> tuple[int | None, str | None]:
    """The errno of a write error a user can act on (full, read-only, denied, a file in the way) and the path it
    names if any; (None, None) for any other error."""
    if isinstance(err, OSError):
        code, path = err.errno, err.filename
    elif isinstance(err, SafetensorError):
        found = _SAFETENSORS_ERRNO.search(str(err))
        code = int(found.group(1) or found.group(2)) if found else None
        named = _SAFETENSORS_PATH.search(str(err))
        path = named.group(1) if named else None
    else:
        return None, None
    if code not in _FULL | _DENIED | _IN_THE_WAY | _FAILING:
        return None, None
    return code, None if path is None else os.fsdecode(path)


def write_error(err: BaseException, store: str | os.PathLike | None = None) -> WriteError | None:
    """A WriteError for a full or read-only disk met where no destination was named, naming the folder of the path
    the error gives; None for any other error (a denied read is no write error). A path inside `store` is the
    store's, moved with STORE_OPTION."""
    code, path = disk_error(err)
    if code not in _FULL | {errno.EROFS}:
        return None
    if path is not None and store is not None and _inside(path, Path(store)):
        return WriteError(_message(_nearest_folder(Path(path)), code, STORE_OPTION))
    option = f"--out, --run-dir or {STORE_OPTION}"
    if path is None:  # a write() that found the disk full names no file
        what = "free space, or choose" if code in _FULL else "choose"
        return WriteError(f"cannot write ({os.strerror(code)}): {what} other folders with {option}")
    return WriteError(_message(_nearest_folder(Path(path)), code, option))


def _message(path: Path, code: int | None, option: str) -> str:
    reason = os.strerror(code) if code is not None else "cannot be written"
    return f"cannot write to {path} ({reason}): {_advice(code, option)}"


def _advice(code: int | None, option: str) -> str:
    if code in _FULL:
        return f"free space there or choose another folder with {option}"
    if code in _IN_THE_WAY:
        return f"choose another folder with {option}"
    if code in _FAILING:
        return f"check the disk, or choose another folder with {option}"
    return f"make it writable or choose another folder with {option}"


def _inside(path: str | os.PathLike, folder: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def _nearest_folder(path: Path) -> Path:
    """The nearest folder at or above `path` that exists (a temporary file or folder that failed is gone)."""
    return next((p for p in (path, *path.parents) if p.is_dir()), path)

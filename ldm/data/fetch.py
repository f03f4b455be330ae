"""What the data sets that download share: the user cache folder and a streamed download with progress."""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO


def user_cache_dir(name: str) -> Path:
    """The user cache folder of data set `name`, where downloads go (``XDG_CACHE_HOME`` respected)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ldm" / name


def search_dirs(name: str, system: Sequence[Path] = ()) -> list[Path]:
    """The folders data set `name` is looked for in, in order: ``$LDM_DATA/<name>``, ``$LDM_DATA`` itself
    (when set), the `system` folders, the user cache."""
    dirs = []
    if os.environ.get("LDM_DATA"):
        env = Path(os.environ["LDM_DATA"]).expanduser()
        dirs += [env / name, env]
    return dirs + list(system) + [user_cache_dir(name)]


def stream_download(url: str, out: BinaryIO, label: str, timeout: float) -> int:
    """Write `url`'s body into the open file `out`, showing `label`'s progress on stderr; return the bytes written."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0)
        done, last_shown = 0, 0.0
        while chunk := response.read(1 << 16):
            out.write(chunk)
            done += len(chunk)
            if time.monotonic() - last_shown > 0.2 or done == total:
                last_shown = time.monotonic()
                of_total = f"/{total / 1e6:.1f} MB {100 * done / total:5.1f}%" if total else " MB"
                print(f"\r  {label}: {done / 1e6:6.1f}{of_total}", end="", file=sys.stderr)
    print(file=sys.stderr)
    return done

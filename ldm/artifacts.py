"""Versioned artifacts: atomic writes, checksum-verified loads, manifests with lineage.

An artifact is a folder `<root>/<stage>/<version>/` holding safetensors files, `config.yaml`
and `manifest.json`. The version is a hash of the files' contents (the config among them) and of
the manifest's sealed fields, so the same result saved twice is the same artifact, and a manifest
edited after saving no longer matches its version and is refused on every load. References:
`stage@version`, `stage@<prefix>`, `stage@latest`, or the path of an artifact folder.

The store reads regular files only, and never through a link: an artifact folder that is a link, or a
listed file that is a link, FIFO or device, is a damaged artifact (the store root and its stage folders
may be links, to put the store on another disk). Manifest and config are read up to METADATA_MAX_BYTES.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import stat
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from ldm.destinations import STORE_OPTION, check_writable, writing_to

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
STAGES = ("autoencoder", "classifier", "latents", "diffusion", "parser")
MANIFEST_FORMAT = 2  # 2: the version seals the manifest's fields; absent: legacy, the version hashes the files only
# Manifest keys the version leaves out: descriptive records that two saves of one result may differ
# in (when, with which library versions, how long training or encoding took) or that are added after
# saving (metrics). Every other key can change what loading the artifact does, so the version seals
# it. `files` is covered all the same, by the files' own `name:sha256` lines.
UNSEALED_KEYS = frozenset({"version", "created", "libraries", "files", "metrics", "training", "encode"})
# Keys `save` writes itself, which its `metadata` must not overwrite.
_SAVE_KEYS = frozenset(
    {"stage", "version", "manifest_format", "created", "parents", "data_fingerprint", "libraries", "files"}
)
# Keys `update_manifest` may change: the unsealed ones except the version and files, which are the artifact.
_UPDATABLE_KEYS = UNSEALED_KEYS - {"version", "files"}
# manifest.json and config.yaml are read whole on every load. A real one is a few kB (a latent cache's files
# table adds ~150 bytes a shard, so even 10,000 shards stay near 1.5 MiB); 8 MiB is far above any real one and
# still quick to read and parse, so a larger file (or one that never ends) is refused unread.
METADATA_MAX_BYTES = 8 << 20
# A write fills a hidden `.tmp-*` folder of its stage and holds a lock on the file LOCK_FILE in it until it
# commits or aborts. `.damaged-*`: where earlier versions moved a damaged copy to delete it.
TEMP_PREFIXES = (".tmp-", ".damaged-")
LOCK_FILE = ".lock"
# A temporary folder without a lock file is stale only once unchanged this long: a writer has not locked its
# folder yet in its first instant, nor after it removed the lock file just before renaming the folder.
STALE_AFTER_SECONDS = 60


class ArtifactError(RuntimeError):
    """An artifact that cannot be found, resolved or trusted."""


class DamagedArtifactError(ArtifactError):
    """An artifact folder whose manifest is missing, unreadable, or no longer matches its version."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name} is damaged: {reason}")
        self.name, self.reason = name, reason


class ArtifactWarning(UserWarning):
    """Something the store did that the user should know of (`stage@latest` passing over a damaged newer folder)."""


class StoreFileError(ArtifactError):
    """A file of an artifact that the store will not read.

    Not a regular file (a link, FIFO, device), or too large for metadata.
    """


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_KINDS = (
    (stat.S_ISLNK, "symbolic link"),
    (stat.S_ISDIR, "folder"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def _check_regular(path: Path, mode: int) -> None:
    """Raise StoreFileError unless `mode` is a regular file's (links are never followed: they may point anywhere)."""
    if not stat.S_ISREG(mode):
        kind = next((name for is_kind, name in _KINDS if is_kind(mode)), "special file")
        raise StoreFileError(
            f"{path.name} is a {kind}, not a regular file; an artifact holds regular files only: "
            f"put the file itself there or re-create the artifact"
        )


def _open_regular(path: Path) -> int:
    """Return a read-only descriptor of `path`, opened only once lstat shows a regular file; StoreFileError if not."""
    _check_regular(path, os.lstat(path).st_mode)  # before opening: a FIFO would block the open, a device never end
    # Swapped for a link or a FIFO since the lstat: O_NOFOLLOW fails on the link, O_NONBLOCK returns at once.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        _check_regular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_metadata(path: Path) -> bytes:
    """Return the bytes of an artifact's manifest or config: a regular file of at most METADATA_MAX_BYTES."""
    limit = METADATA_MAX_BYTES
    with os.fdopen(_open_regular(path), "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        data = handle.read(limit + 1) if size <= limit else b""  # one that grows meanwhile is read no further
    size = max(size, len(data))
    if size > limit:
        raise StoreFileError(
            f"{path.name} is {size} bytes, more than the {limit} bytes allowed for an artifact's manifest or config; "
            f"restore the file or re-create the artifact"
        )
    return data


def _sha256_stored(path: Path) -> str:
    """Return the hex sha256 of an artifact's file, read only when it is a regular file (StoreFileError if not)."""
    digest = hashlib.sha256()
    with os.fdopen(_open_regular(path), "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _plain_name(name: str) -> bool:
    """Whether `name` names a visible file inside its folder (no separator, no `..`, no leading dot)."""
    return bool(name) and Path(name).name == name and not name.startswith(".")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_mode(directory: bool = False) -> int:
    """Permissions that open() or mkdir() would give under the process umask (0644 / 0755 with 022).

    mkstemp and mkdtemp create private 0600 / 0700 entries; an artifact renamed from one would
    stay unreadable to the rest of a group sharing the store, so they are opened up to this.
    """
    mask = os.umask(0o022)  # the only way to read the umask is to set it; put it straight back
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, plain_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def library_versions() -> dict[str, str]:
    """Return the versions of the libraries that shape a result."""
    import lightning
    import safetensors

    from ldm import __version__

    return {
        "ldm": __version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


@dataclass
class Artifact:
    """One stored artifact: its folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def ref(self) -> str:
        """The canonical reference `stage@version`."""
        return f"{self.stage}@{self.version}"

    @property
    def parents(self) -> dict[str, str]:
        return self.manifest.get("parents", {})

    @property
    def sealed(self) -> bool:
        """Whether the version covers the manifest's fields (False: a legacy artifact's version hashes files only)."""
        return "manifest_format" in self.manifest

    def config(self) -> dict[str, Any]:
        """Return the stored config as a plain dict."""
        return yaml.safe_load(self.config_text()) or {}

    def config_text(self) -> str:
        """Return config.yaml as stored (a regular file of at most METADATA_MAX_BYTES)."""
        try:
            return _read_metadata(self.path / CONFIG).decode()
        except StoreFileError as err:
            raise DamagedArtifactError(self.ref, str(err)) from None

    def load_tensors(
        self, name: str = "weights.safetensors", device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Return the tensors of one safetensors file of this artifact (no pickle)."""
        return load_file(self._file(name), device=str(device))

    def read_json(self, name: str) -> Any:
        """Return the JSON content of one file of this artifact (a latent cache's captions.json)."""
        try:
            return json.loads(self._file(name).read_bytes())
        except (OSError, ValueError) as err:
            raise DamagedArtifactError(self.ref, f"{name} cannot be read as JSON ({err})") from None

    def map_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Return the tensors of one safetensors file as read-only views of a memory map of it.

        Nothing is read until it is indexed, and the pages come from the OS page cache, so
        processes on one machine (DDP ranks) share one copy of a large latent cache instead of
        each holding its own, and a cache larger than RAM still opens. Do not write to the
        tensors: the map is private, a write would copy the page and change nothing on disk.
        """
        return map_safetensors(self._file(name))

    def _file(self, name: str) -> Path:
        """The path of the file `name` the manifest lists, refused when it is there but not a regular file."""
        if name not in self.manifest["files"]:
            raise ArtifactError(f"{self.ref} has no file {name}; it has {', '.join(self.manifest['files'])}")
        path = self.path / name
        try:
            _check_regular(path, os.lstat(path).st_mode)
        except FileNotFoundError:
            pass  # the loader's own error names it
        except StoreFileError as err:
            raise DamagedArtifactError(self.ref, str(err)) from None
        return path

    def file_problem(self) -> str | None:
        """Return why a file does not match the manifest's sha256, or None when all match.

        A file fails when it is missing, not a regular file, unreadable, or changed.
        """
        for name, expected in self.manifest["files"].items():
            file = self.path / name
            try:
                actual = _sha256_stored(file)
            except FileNotFoundError:
                return f"file {file} is missing; the artifact is incomplete, re-create it"
            except StoreFileError as err:
                return str(err)
            except OSError as err:
                return f"file {file} cannot be read ({err})"
            if actual != expected["sha256"]:
                return (
                    f"checksum mismatch for {file} (expected sha256 {expected['sha256'][:16]}..., "
                    f"got {actual[:16]}...). The file is corrupted or was changed after saving; "
                    f"re-create the artifact or restore the file."
                )
        return None

    def verify(self) -> None:
        """Check every file against the manifest's sha256; raise ArtifactError on any mismatch."""
        problem = self.file_problem()
        if problem is not None:
            raise ArtifactError(f"{self.ref}: {problem}")


@dataclass
class Verdict:
    """What `ArtifactStore.audit` found for one artifact folder."""

    name: str  # `stage@version` of a sound manifest, else the folder (`stage/<folder>` in the store)
    problem: str | None = None  # why it failed; None when it passed
    legacy: bool = False  # passed, but saved before manifests were sealed: its fields are unchecked


def read_manifest(path: Path, name: str | None = None) -> dict[str, Any]:
    """Return the manifest of the artifact folder `path` once it matches its version; raise DamagedArtifactError if not.

    Only manifest.json and the small config.yaml are read (hashing the tensor files is `Artifact.verify`),
    so every load makes this check. Nothing is read through a link or from a special file: the folder and
    every file it lists must be themselves. `name` labels the folder in the error (default: its path).
    """
    name = name or str(path)
    if os.path.islink(path):  # checked before reading: a link named as one version may point at any other folder
        raise DamagedArtifactError(
            name,
            f"the folder is a symbolic link (to {os.readlink(path)}); the store holds artifact folders themselves, "
            f"each under its own version: delete the link",
        )
    manifest = _parse_manifest(path / MANIFEST, name)
    problem = (
        _shape_problem(manifest)
        or _seal_problem(manifest)
        or _folder_problem(path, manifest)
        or _files_problem(path, manifest)
        or _config_problem(path, manifest)
    )
    if problem is not None:
        raise DamagedArtifactError(name, problem)
    return manifest


def _parse_manifest(file: Path, name: str) -> Any:
    try:
        return json.loads(_read_metadata(file))
    except FileNotFoundError:
        raise DamagedArtifactError(
            name, "no manifest.json in the folder; delete the folder or restore the file"
        ) from None
    except StoreFileError as err:
        raise DamagedArtifactError(name, str(err)) from None
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad UTF-8 or bad JSON
        raise DamagedArtifactError(
            name, f"manifest.json cannot be read as JSON ({err}); restore the file or re-create the artifact"
        ) from err


def _shape_problem(manifest: Any) -> str | None:
    """Why `manifest` lacks the fields every other check reads, or None."""
    fix = "restore manifest.json or re-create the artifact"
    if not isinstance(manifest, dict) or not all(isinstance(manifest.get(key), str) for key in ("stage", "version")):
        return f"manifest.json is not an artifact manifest (a JSON object with a stage and a version); {fix}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(f, dict) and isinstance(f.get("sha256"), str) for f in files.values()
    ):
        return f"manifest.json has no valid files table (each file's sha256); {fix}"
    parents = manifest.get("parents", {})
    if not isinstance(parents, dict) or not all(isinstance(ref, str) for ref in parents.values()):
        return f"manifest.json's parents is not a table of stage: reference; {fix}"
    return None


def _seal_problem(manifest: dict[str, Any]) -> str | None:
    """Why the manifest's fields and file checksums no longer hash to its version, or None when they do."""
    form = manifest.get("manifest_format")
    if form is None:
        # Legacy (before format 2): the files alone. A format-2 version never equals it, so deleting
        # manifest_format from an edited manifest does not pass this check.
        expected = _version(manifest["files"], None)
    elif form == MANIFEST_FORMAT:
        expected = _version(manifest["files"], _sealed_fields(manifest))
    else:
        return (
            f"its manifest_format {form!r} is not one this ldm reads ({MANIFEST_FORMAT}); "
            "upgrade ldm or re-create the artifact"
        )
    if expected != manifest["version"]:
        return (
            f"manifest.json was changed after saving (its fields no longer hash to its version {manifest['version']}); "
            f"restore the file or re-create the artifact"
        )
    return None


def _folder_problem(path: Path, manifest: dict[str, Any]) -> str | None:
    """Why the folder's name is not the version it holds, or None."""
    version = manifest["version"]
    if Path(os.path.abspath(path)).name != version:  # abspath, not resolve: "." names its folder, no link is followed
        return (
            f"the folder holds version {version} under another name; rename it to {version} or re-create the artifact"
        )
    return None


def _files_problem(path: Path, manifest: dict[str, Any]) -> str | None:
    """Why a file the manifest lists is not a plain name in the folder or not a regular file, or None.

    A missing file is left to `Artifact.verify`; only lstat is used, so nothing is opened here.
    """
    for name in manifest["files"]:
        if not _plain_name(name):
            return (
                f"manifest.json names {name!r}, which is not a plain file name in the folder; "
                f"restore manifest.json or re-create the artifact"
            )
        try:
            _check_regular(Path(path) / name, os.lstat(Path(path) / name).st_mode)
        except FileNotFoundError:
            continue
        except StoreFileError as err:
            return str(err)
    return None


def _config_problem(path: Path, manifest: dict[str, Any]) -> str | None:
    """Why config.yaml no longer matches its sha256 in the manifest, or None.

    The config shapes what a load builds as much as the manifest does, and is small, so it is hashed on
    every load; the tensor files wait for `Artifact.verify`.
    """
    expected = manifest["files"].get(CONFIG)
    if expected is None:
        return None
    try:
        actual = hashlib.sha256(_read_metadata(Path(path) / CONFIG)).hexdigest()
    except FileNotFoundError:
        return "config.yaml is missing; restore it or re-create the artifact"
    except StoreFileError as err:
        return str(err)
    except OSError as err:
        return f"config.yaml cannot be read ({err}); restore it or re-create the artifact"
    if actual != expected["sha256"]:
        return (
            "config.yaml was changed after saving (its sha256 is not the manifest's); "
            "restore it or re-create the artifact"
        )
    return None


def _sealed_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in manifest.items() if key not in UNSEALED_KEYS}


def _version(files: dict[str, dict[str, Any]], sealed: dict[str, Any] | None) -> str:
    """The first 12 hex of sha256 over the files' sorted `name:sha256` lines, then the sealed fields' canonical JSON.

    `sealed` None gives the legacy version, of the files alone.
    """
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}:{files[name]['sha256']}\n".encode())
    if sealed is not None:
        # Round trip first, so what JSON cannot keep (tuples, int keys) hashes as a reader will see it.
        plain = json.loads(json.dumps(sealed))
        digest.update(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()[:12]


def _age(artifact: Artifact) -> tuple[str, float]:
    """Sort key, oldest first: the manifest's `created`, then the folder's mtime (created is unsealed: any type)."""
    return str(artifact.manifest.get("created") or ""), artifact.path.stat().st_mtime


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ArtifactError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Return the tensors of a safetensors file as views of one private read-only memory map of it.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
    shape and [begin, end) byte range in the data that follows, then the raw data.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ArtifactError(f"{path} is not a safetensors file: {size} bytes is shorter than its header")
        header_len = int.from_bytes(prefix, "little")
        if 8 + header_len > size:
            raise ArtifactError(f"{path} is truncated: its header says {header_len} bytes, the file has {size}")
        header = json.loads(handle.read(header_len))
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)  # MAP_PRIVATE: no copy
    tensors = {}
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ArtifactError(f"{path}: tensor {key} has dtype {info['dtype']}, which this reader does not map")
        begin, end = (data_start + offset for offset in info["data_offsets"])
        if end > size:
            raise ArtifactError(f"{path} is truncated: tensor {key} ends at byte {end} of {size}")
        chunk = raw[begin:end]
        if begin % dtype.itemsize:
            chunk = chunk.clone()  # misaligned for its dtype: the one case that is read into memory
        tensors[key] = chunk.view(dtype).reshape(info["shape"])
    return tensors


class ArtifactWriter:
    """An artifact written file by file into a hidden folder of its stage, then made visible at once by `commit`.

    Each file is fsynced and hashed as it is written, so an artifact larger than memory (a latent
    cache's shards) is written one file at a time. Leaving the `with` block without committing (an
    exception, an interrupt) removes the folder: a failed write leaves nothing in the store. A writer
    that dies without unwinding (SIGKILL, power loss) leaves its folder, which no process then holds
    the lock of: `ArtifactStore.clean`, or the next write of the stage, removes it.
    """

    def __init__(self, store: ArtifactStore, stage: str):
        _check_stage(stage)
        self.store, self.stage = store, stage
        self.stage_dir = store.root / stage
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.folder, self._lock = _locked_temp_folder(self.stage_dir)
        self.files: dict[str, dict[str, Any]] = {}  # name -> sha256 and bytes, of the files written so far
        self.closed = False  # committed or aborted
        self._file_mode = plain_mode()
        try:
            store.clean(stage)  # leftovers of writes of this stage that died
        except OSError:
            pass  # one that cannot be removed (another user's) must not stop this write

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if not self.closed:
            self.abort()

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write one safetensors file of the artifact (no pickle)."""
        path = self._new_file(name)
        save_file({key: value.detach().contiguous().cpu() for key, value in tensors.items()}, str(path))
        self._seal_file(path)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write one file of the artifact holding `data`."""
        path = self._new_file(name)
        path.write_bytes(data)
        self._seal_file(path)

    def commit(
        self,
        *,
        config: dict[str, Any],
        parents: dict[str, str] | None = None,
        data_fingerprint: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Artifact:
        """Write config.yaml and the manifest, rename the folder to its version and return the artifact.

        An identical artifact already stored is returned as is (a damaged stored copy is replaced).
        """
        self._check_open()
        try:
            overwritten = sorted(_SAVE_KEYS & set(metadata or {}))
            if overwritten:
                raise ArtifactError(f"metadata must not set {', '.join(overwritten)}: save writes them itself")
            config_file = self.folder / CONFIG
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
            self._seal_file(config_file)
            files = dict(sorted(self.files.items()))
            manifest = {
                "stage": self.stage,
                "manifest_format": MANIFEST_FORMAT,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "parents": dict(parents or {}),
                "data_fingerprint": data_fingerprint,
                **(metadata or {}),
                "libraries": library_versions(),
                "files": files,
            }
            version = _version(files, _sealed_fields(manifest))
            manifest = {"stage": self.stage, "version": version, **manifest}
            final = self.stage_dir / version
            if os.path.lexists(final):
                existing = self.store._stored_copy(final, self.stage)
                if existing is not None:
                    self.abort()
                    return existing
            (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
            with open(self.folder / MANIFEST, "rb") as handle:
                os.fsync(handle.fileno())
            _fsync_dir(self.folder)
            os.chmod(self.folder, plain_mode(directory=True))
            os.unlink(self.folder / LOCK_FILE)  # not part of the artifact; the lock itself holds until it is closed
            os.rename(self.folder, final)
            _fsync_dir(self.stage_dir)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self._unlock()
        return Artifact(final, manifest)

    def abort(self) -> None:
        """Remove the folder and everything written to it."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.closed = True
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _check_open(self) -> None:
        if self.closed:
            raise ArtifactError(f"this {self.stage} artifact was already committed or aborted; start a new writer")

    def _new_file(self, name: str) -> Path:
        """The path for file `name`, refused when it is taken, reserved or not a plain file name."""
        self._check_open()
        if name in self.files or name in (CONFIG, MANIFEST) or not _plain_name(name):
            raise ArtifactError(
                f"cannot write {name!r}: artifact files need distinct plain names other than {CONFIG} and {MANIFEST}"
            )
        return self.folder / name

    def _seal_file(self, path: Path) -> None:
        """Make a written file readable under the umask, fsync it and record its sha256 and size."""
        os.chmod(path, self._file_mode)  # safetensors writes 0600 files
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        self.files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}


class ArtifactStore:
    """A folder of versioned artifacts (default `./artifacts`, or `LDM_HOME`)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or os.environ.get("LDM_HOME") or "artifacts")

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    def check_writable(self, artifact: Artifact | None = None) -> None:
        """Raise WriteError unless a new artifact (or, given `artifact`, a new manifest of it) can be written here."""
        check_writable(self.root if artifact is None else artifact.path, STORE_OPTION)

    # ---- writing ----------------------------------------------------------------------------

    def save(
        self,
        stage: str,
        *,
        tensors: dict[str, dict[str, torch.Tensor]],
        config: dict[str, Any],
        parents: dict[str, str] | None = None,
        data_fingerprint: str | None = None,
        metadata: dict[str, Any] | None = None,
        extra_files: dict[str, bytes] | None = None,
    ) -> Artifact:
        """Write an artifact atomically and return it; an identical artifact already stored is returned as is.

        `tensors` maps file names (`weights.safetensors`, `shard-00000.safetensors`, ...) to the
        tensors they hold; `parents` maps the parent stage to its `stage@version` reference.
        """
        with writing_to(self.root, STORE_OPTION), self.writer(stage) as writer:  # a full disk: one line, nothing left
            for name, named in tensors.items():
                writer.write_tensors(name, named)
            for name, data in (extra_files or {}).items():
                writer.write_bytes(name, data)
            return writer.commit(config=config, parents=parents, data_fingerprint=data_fingerprint, metadata=metadata)

    def writer(self, stage: str) -> ArtifactWriter:
        """Return an ArtifactWriter for a new `stage` artifact, to fill file by file and commit (use it in a `with`)."""
        return ArtifactWriter(self, stage)

    def _stored_copy(self, final: Path, stage: str) -> Artifact | None:
        """The sound stored copy of an artifact being saved again; None once a damaged one is removed to be replaced."""
        try:
            existing = self._open(final, stage)
            existing.verify()
            return existing
        except ArtifactError:
            # The same version is the same result: the new save is what "re-create the artifact" asks for.
            # Moved into a locked temporary folder first, so that removal cut short leaves a leftover `clean` finds.
            aside, lock = _locked_temp_folder(final.parent)
            try:
                os.rename(final, aside / final.name)
                shutil.rmtree(aside)
            finally:
                os.close(lock)
            return None

    def update_manifest(self, artifact: Artifact, **fields: Any) -> Artifact:
        """Merge unsealed `fields` (metrics measured later) into an artifact's manifest with an atomic rewrite.

        Sealed fields, the version and the files are refused: changing them would make another artifact.
        """
        manifest = read_manifest(artifact.path)  # from disk: a stale or edited copy in memory must not be written back
        refused = sorted(
            key for key, value in fields.items() if key not in _UPDATABLE_KEYS and manifest.get(key) != value
        )
        if refused:
            raise ArtifactError(
                f"cannot change {', '.join(refused)} of {artifact.ref}: sealed into its version; "
                "save a new artifact instead"
            )
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key] = {**manifest[key], **value}
            else:
                manifest[key] = value
        with writing_to(artifact.path, STORE_OPTION):
            write_atomic(artifact.path / MANIFEST, json.dumps(manifest, indent=2).encode())
        return Artifact(artifact.path, manifest)

    # ---- reading ----------------------------------------------------------------------------

    def resolve(self, ref: str, stage: str | None = None) -> Path:
        """Return the folder of the artifact `ref` names, its manifest checked; ArtifactError saying what exists."""
        return self._find(str(ref), stage).path

    def load(self, ref: str, stage: str | None = None, verify: bool = True) -> Artifact:
        """Return the artifact `ref` names, its manifest checked against its version.

        With `verify`, its files are checked against their sha256 as well.
        """
        artifact = self._find(str(ref), stage)
        if stage is not None and artifact.stage != stage:
            raise ArtifactError(
                f"{artifact.path} holds a {artifact.stage} artifact, but a {stage} artifact is needed here"
            )
        if verify:
            artifact.verify()
        return artifact

    def scan(self, stage: str | None = None) -> tuple[list[Artifact], list[tuple[Path, str]]]:
        """Return the sound artifacts (of one stage, or all; oldest first) and the damaged folders, each with why."""
        good, broken = [], []
        for name in [stage] if stage else STAGES:
            _check_stage(name)
            for path in self._folders(name):
                try:
                    good.append(self._open(path, name))
                except DamagedArtifactError as err:
                    broken.append((path, err.reason))
        return sorted(good, key=_age), broken

    def list(self, stage: str | None = None) -> list[Artifact]:
        """Return the sound stored artifacts (of one stage or all), oldest first; `scan` also names the damaged ones."""
        return self.scan(stage)[0]

    def audit(self, ref: str | None = None) -> list[Verdict]:
        """Return a Verdict for the artifact `ref` names or every folder in the store: manifest and files checked."""
        if ref is not None:
            try:
                return [_verdict(self._find(str(ref)))]
            except DamagedArtifactError as err:
                return [Verdict(err.name, err.reason)]
        good, broken = self.scan()
        return [_verdict(artifact) for artifact in good] + [Verdict(_label(path), reason) for path, reason in broken]

    def temp_folders(self, stage: str | None = None) -> list[TempFolder]:
        """Return the temporary folders of writes in the store (of one stage, or all): running ones and leftovers."""
        return [found for path in self._temp_paths(stage) if (found := _temp_folder(path)) is not None]

    def clean(self, stage: str | None = None, dry_run: bool = False) -> list[TempFolder]:
        """Remove the stale temporary folders (of one stage, or all; `dry_run`: none) and return every one found.

        Each is checked and removed under its lock, so a folder a live writer holds is never removed.
        """
        return [
            found for path in self._temp_paths(stage) if (found := _temp_folder(path, remove=not dry_run)) is not None
        ]

    def lineage(self, artifact: Artifact) -> list[Artifact]:
        """Return the artifact followed by its ancestors, nearest first, by following the manifests' parents."""
        chain, queue = [artifact], list(artifact.parents.values())
        while queue:
            parent = self.load(queue.pop(0), verify=False)
            chain.append(parent)
            queue.extend(parent.parents.values())
        return chain

    def _find(self, ref: str, stage: str | None = None) -> Artifact:
        """The artifact `ref` names with its manifest checked; DamagedArtifactError when that folder is damaged."""
        if "@" not in ref:
            path = Path(ref)
            if os.path.lexists(path / MANIFEST) or (stage is None and path.is_dir()):
                # A link the user named is followed once, to the real folder, which is checked as any other.
                path = Path(os.path.realpath(path))
                return Artifact(path, read_manifest(path))
            if stage is None:
                raise ArtifactError(
                    f"cannot resolve {ref!r}: use stage@version, stage@<prefix>, stage@latest or an artifact folder"
                )
            ref = f"{stage}@{ref}"
        ref_stage, key = ref.split("@", 1)
        if stage is not None and ref_stage != stage:
            raise ArtifactError(f"{ref!r} names a {ref_stage} artifact, but a {stage} artifact is needed here")
        _check_stage(ref_stage)
        if key == "latest":
            return self._latest(ref_stage)
        return self._open(self._match(ref_stage, key), ref_stage)

    def _latest(self, stage: str) -> Artifact:
        good, broken = self.scan(stage)
        if good:
            latest = max(good, key=_age)
            made = _made(latest.path, latest.manifest)
            for path, reason in broken:
                if _made(path) > made:  # the user may think latest is this one
                    warnings.warn(
                        f"{stage}@latest is {latest.ref}, not the newer {_label(path)}, which is damaged: {reason}",
                        ArtifactWarning,
                        stacklevel=4,
                    )
            return latest
        if broken:
            damaged = "; ".join(f"{_label(path)}: {reason}" for path, reason in broken)
            raise ArtifactError(f"every {stage} folder in the store {self.root} is damaged: {damaged}")
        raise ArtifactError(
            f"no {stage} artifacts in the store {self.root}; create one first "
            f"(or point --store / LDM_HOME at the store that has it)"
        )

    def _match(self, stage: str, prefix: str) -> Path:
        folders = self._folders(stage)
        if not folders:
            raise ArtifactError(
                f"no {stage} artifacts in the store {self.root}; create one first "
                f"(or point --store / LDM_HOME at the store that has it)"
            )
        matches = [p for p in folders if p.name.startswith(prefix)]
        if not matches:
            known = ", ".join(p.name for p in folders)
            raise ArtifactError(f"no {stage} artifact matches {prefix!r} in {self.root}; known versions: {known}")
        if len(matches) > 1:
            raise ArtifactError(
                f"{stage}@{prefix} is ambiguous: it matches {', '.join(p.name for p in matches)}; give more characters"
            )
        return matches[0]

    def _open(self, path: Path, stage: str) -> Artifact:
        """The artifact in store folder `<stage>/<path.name>`; DamagedArtifactError unless it is sound and in place."""
        manifest = read_manifest(path, _label(path))
        if manifest["stage"] != stage:
            raise DamagedArtifactError(
                _label(path), f"it holds a {manifest['stage']} artifact; move it to {manifest['stage']}/ or delete it"
            )
        return Artifact(path, manifest)

    def _folders(self, stage: str) -> list[Path]:
        """Every entry folder of a stage, sound or damaged, links among them (hidden ones are saves in progress)."""
        stage_dir = self.root / stage
        if not stage_dir.is_dir():
            return []
        return sorted(p for p in stage_dir.iterdir() if not p.name.startswith(".") and (p.is_dir() or p.is_symlink()))

    def _temp_paths(self, stage: str | None) -> list[Path]:
        """The hidden temporary folders of writes in the stage folders (real folders only: a link is never followed)."""
        paths = []
        for name in [stage] if stage else STAGES:
            _check_stage(name)
            stage_dir = self.root / name
            if stage_dir.is_dir():
                paths += sorted(p for p in stage_dir.iterdir() if p.name.startswith(TEMP_PREFIXES) and _is_real_dir(p))
        return paths


def _made(path: Path, manifest: Any = None) -> str:
    """When the folder's artifact was made, as `created` says it.

    The manifest's own if it reads, else the folder's mtime.
    """
    if manifest is None and not os.path.islink(path):
        try:
            manifest = json.loads(_read_metadata(path / MANIFEST))
        except (ArtifactError, OSError, ValueError, RecursionError):
            pass
    created = manifest.get("created") if isinstance(manifest, dict) else None
    if isinstance(created, str) and created:
        return created
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.lstat(path).st_mtime))


@dataclass
class TempFolder:
    """A hidden temporary folder of a write in a stage folder, as `ArtifactStore.temp_folders` found it."""

    path: Path
    bytes: int  # of the regular files in it
    age: float  # seconds since anything in it last changed
    held: bool  # a live writer holds its lock
    has_lock_file: bool

    @property
    def stale(self) -> bool:
        """Left by a write that died: no process holds its lock (and, without a lock file, unchanged for a while)."""
        return not self.held and (self.has_lock_file or self.age >= STALE_AFTER_SECONDS)


def _locked_temp_folder(stage_dir: Path) -> tuple[Path, int]:
    """Return a new hidden temporary folder of `stage_dir` and the descriptor of the lock held on it until closed."""
    folder = Path(tempfile.mkdtemp(dir=stage_dir, prefix=TEMP_PREFIXES[0]))
    try:
        lock = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, plain_mode())
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, lock


def _temp_folder(path: Path, remove: bool = False) -> TempFolder | None:
    """What the temporary folder `path` is (None: gone meanwhile, committed or removed); with `remove`, a stale one is
    removed while its lock is held here."""
    try:
        try:  # O_NOFOLLOW and O_NONBLOCK: a planted link or FIFO in its place is neither followed nor waited on
            lock = os.open(path / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            lock = None
        except OSError:  # a lock file this process may not open (another user's): treat it as held, leave it be
            return TempFolder(path, *_tree_usage(path), held=True, has_lock_file=True)
        try:
            held = False
            if lock is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held = True
            found = TempFolder(path, *_tree_usage(path), held=held, has_lock_file=lock is not None)
            if remove and found.stale:
                shutil.rmtree(path)
            return found
        finally:
            if lock is not None:
                os.close(lock)
    except FileNotFoundError:
        return None


def _tree_usage(path: Path) -> tuple[int, float]:
    """The bytes of regular files under `path` and the seconds since anything there last changed (no link followed)."""
    size, changed = 0, os.lstat(path).st_mtime
    for folder, subfolders, files in os.walk(path):
        for name in subfolders + files:
            try:
                info = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:  # removed meanwhile by its writer
                continue
            changed = max(changed, info.st_mtime)
            size += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return size, max(0.0, time.time() - changed)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _label(path: Path) -> str:
    """`stage/<folder>`: how a store folder is named when its manifest cannot be trusted to name it."""
    return f"{path.parent.name}/{path.name}"


def _verdict(artifact: Artifact) -> Verdict:
    return Verdict(artifact.ref, artifact.file_problem() or _records_problem(artifact), legacy=not artifact.sealed)


# A sealed record: something derived from an artifact after saving and reused, that changes what a
# command computes with it (a step-caching schedule). It lives in the unsealed metrics, since adding
# it must not make another artifact, but carries a sha256 over itself, its key and the artifact's version.
RECORD_SEAL = "sealed_sha256"


def seal_record(artifact: Artifact, key: str, record: dict[str, Any]) -> dict[str, Any]:
    """`record` with the artifact's version and a RECORD_SEAL over both and `key`, to store as metrics[key]."""
    record = {**record, "artifact": artifact.version}
    return {**record, RECORD_SEAL: _record_digest(key, record)}


def record_problem(artifact: Artifact, key: str) -> str | None:
    """Why the sealed record metrics[key] fails its seal (edited, or moved from another key or artifact), or None."""
    record = artifact.manifest["metrics"][key]
    body = {name: value for name, value in record.items() if name != RECORD_SEAL}
    if body.get("artifact") == artifact.version and record[RECORD_SEAL] == _record_digest(key, body):
        return None
    return (
        f"metrics[{key!r}] was changed, or moved from another entry or artifact, after it was stored (it does not "
        f"match its {RECORD_SEAL}); delete that entry from {artifact.path / MANIFEST} to compute it again"
    )


def _records_problem(artifact: Artifact) -> str | None:
    """The problem of the first sealed record in the artifact's metrics that does not match its seal, or None."""
    metrics = artifact.manifest.get("metrics")
    for key, record in metrics.items() if isinstance(metrics, dict) else ():
        if isinstance(record, dict) and RECORD_SEAL in record:
            problem = record_problem(artifact, key)
            if problem is not None:
                return problem
    return None


def _record_digest(key: str, record: dict[str, Any]) -> str:
    plain = json.loads(json.dumps(record))  # as a reader of the manifest will see it
    return hashlib.sha256(
        json.dumps({"key": key, "record": plain}, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()

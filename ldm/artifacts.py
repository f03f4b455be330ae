"""Versioned artifacts: atomic writes, checksum-verified loads, manifests with lineage.

An artifact is a folder `<root>/<stage>/<version>/` holding safetensors files, `config.yaml`
and `manifest.json`. The version is a hash of the files' contents and the config, so the same
result saved twice is the same artifact. References: `stage@version`, `stage@<prefix>`,
`stage@latest`, or the path of an artifact folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
STAGES = ("autoencoder", "classifier", "latents", "diffusion")


class ArtifactError(RuntimeError):
    """An artifact that cannot be found, resolved or trusted."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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

    def config(self) -> dict[str, Any]:
        """Return the stored config as a plain dict."""
        return yaml.safe_load((self.path / CONFIG).read_text()) or {}

    def load_tensors(self, name: str = "weights.safetensors", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Return the tensors of one safetensors file of this artifact (no pickle)."""
        if name not in self.manifest["files"]:
            raise ArtifactError(f"{self.ref} has no file {name}; it has {', '.join(self.manifest['files'])}")
        return load_file(self.path / name, device=str(device))

    def map_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Return the tensors of one safetensors file as read-only views of a memory map of it.

        Nothing is read until it is indexed, and the pages come from the OS page cache, so
        processes on one machine (DDP ranks) share one copy of a large latent cache instead of
        each holding its own, and a cache larger than RAM still opens. Do not write to the
        tensors: the map is private, a write would copy the page and change nothing on disk.
        """
        if name not in self.manifest["files"]:
            raise ArtifactError(f"{self.ref} has no file {name}; it has {', '.join(self.manifest['files'])}")
        return map_safetensors(self.path / name)

    def verify(self) -> None:
        """Check every file against the manifest's sha256; raise ArtifactError on any mismatch."""
        for name, expected in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                raise ArtifactError(f"{self.ref}: file {file} is missing; the artifact is incomplete, re-create it")
            actual = sha256_file(file)
            if actual != expected["sha256"]:
                raise ArtifactError(
                    f"{self.ref}: checksum mismatch for {file} (expected sha256 {expected['sha256'][:16]}..., "
                    f"got {actual[:16]}...). The file is corrupted or was changed after saving; "
                    f"re-create the artifact or restore the file."
                )


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
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


class ArtifactStore:
    """A folder of versioned artifacts (default `./artifacts`, or `LDM_HOME`)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or os.environ.get("LDM_HOME") or "artifacts")

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

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
        if stage not in STAGES:
            raise ArtifactError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=stage_dir, prefix=".tmp-"))
        try:
            config_text = yaml.safe_dump(config, sort_keys=False)
            (tmp / CONFIG).write_text(config_text)
            for name, named in tensors.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, str(tmp / name))
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data)
            files, file_mode = {}, plain_mode()
            for file in sorted(tmp.iterdir()):
                os.chmod(file, file_mode)  # safetensors writes 0600 files
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
                files[file.name] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
            version_hash = hashlib.sha256()
            for name, info in files.items():
                version_hash.update(f"{name}:{info['sha256']}\n".encode())
            version = version_hash.hexdigest()[:12]
            final = stage_dir / version
            if final.exists():
                shutil.rmtree(tmp)
                return self.load(f"{stage}@{version}")
            manifest = {
                "stage": stage,
                "version": version,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "parents": dict(parents or {}),
                "data_fingerprint": data_fingerprint,
                **(metadata or {}),
                "libraries": library_versions(),
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
            with open(tmp / MANIFEST, "rb") as handle:
                os.fsync(handle.fileno())
            _fsync_dir(tmp)
            os.chmod(tmp, plain_mode(directory=True))
            os.rename(tmp, final)
            _fsync_dir(stage_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Artifact(final, manifest)

    def update_manifest(self, artifact: Artifact, **fields: Any) -> Artifact:
        """Merge `fields` into an artifact's manifest (metrics measured later) with an atomic rewrite."""
        manifest = dict(artifact.manifest)
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key] = {**manifest[key], **value}
            else:
                manifest[key] = value
        write_atomic(artifact.path / MANIFEST, json.dumps(manifest, indent=2).encode())
        return Artifact(artifact.path, manifest)

    # ---- reading ----------------------------------------------------------------------------

    def resolve(self, ref: str, stage: str | None = None) -> Path:
        """Return the folder of the artifact that `ref` names, or raise ArtifactError saying what exists."""
        ref = str(ref)
        if "@" not in ref:
            path = Path(ref)
            if (path / MANIFEST).is_file():
                return path
            if stage is None:
                raise ArtifactError(
                    f"cannot resolve {ref!r}: use stage@version, stage@<prefix>, stage@latest or an artifact folder"
                )
            ref = f"{stage}@{ref}"
        ref_stage, key = ref.split("@", 1)
        if stage is not None and ref_stage != stage:
            raise ArtifactError(f"{ref!r} names a {ref_stage} artifact, but a {stage} artifact is needed here")
        candidates = self._versions(ref_stage)
        if not candidates:
            raise ArtifactError(
                f"no {ref_stage} artifacts in the store {self.root}; create one first "
                f"(or point --store / LDM_HOME at the store that has it)"
            )
        if key == "latest":
            return max(candidates, key=lambda p: (self._created(p), p.stat().st_mtime))
        matches = [p for p in candidates if p.name.startswith(key)]
        if not matches:
            known = ", ".join(sorted(p.name for p in candidates))
            raise ArtifactError(f"no {ref_stage} artifact matches {key!r} in {self.root}; known versions: {known}")
        if len(matches) > 1:
            raise ArtifactError(
                f"{ref!r} is ambiguous: it matches {', '.join(sorted(p.name for p in matches))}; give more characters"
            )
        return matches[0]

    def load(self, ref: str, stage: str | None = None, verify: bool = True) -> Artifact:
        """Return the artifact `ref` names, its files verified against the manifest's checksums."""
        path = self.resolve(ref, stage)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ArtifactError(f"cannot read the manifest of {path}: {err}") from err
        artifact = Artifact(path, manifest)
        if stage is not None and artifact.stage != stage:
            raise ArtifactError(f"{path} holds a {artifact.stage} artifact, but a {stage} artifact is needed here")
        if verify:
            artifact.verify()
        return artifact

    def list(self, stage: str | None = None) -> list[Artifact]:
        """Return the stored artifacts (of one stage, or all), oldest first."""
        stages = [stage] if stage else STAGES
        found = []
        for name in stages:
            for path in self._versions(name):
                found.append(Artifact(path, json.loads((path / MANIFEST).read_text())))
        return sorted(found, key=lambda a: (a.manifest.get("created", ""), a.path.stat().st_mtime))

    def lineage(self, artifact: Artifact) -> list[Artifact]:
        """Return the artifact followed by its ancestors, nearest first, by following the manifests' parents."""
        chain, queue = [artifact], list(artifact.parents.values())
        while queue:
            parent = self.load(queue.pop(0), verify=False)
            chain.append(parent)
            queue.extend(parent.parents.values())
        return chain

    def _versions(self, stage: str) -> list[Path]:
        stage_dir = self.root / stage
        if not stage_dir.is_dir():
            return []
        return [p for p in stage_dir.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file()]

    @staticmethod
    def _created(path: Path) -> str:
        try:
            return json.loads((path / MANIFEST).read_text()).get("created", "")
        except (OSError, json.JSONDecodeError):
            return ""


def find_in(artifacts: Iterable[Artifact], stage: str) -> Artifact | None:
    """Return the first artifact of `stage` in a sequence (for example a lineage), or None."""
    return next((a for a in artifacts if a.stage == stage), None)

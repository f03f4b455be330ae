import json
import os
import stat

import pytest
import torch

from ldm.artifacts import ArtifactError, ArtifactStore, map_safetensors, write_atomic


def save_one(store, value=1.0, stage="autoencoder", parents=None):
    return store.save(
        stage,
        tensors={"weights.safetensors": {"w": torch.full((3, 2), value), "b": torch.arange(4)}},
        config={"model": {"ch": 8}, "value": value},
        parents=parents,
        data_fingerprint="abc",
        metadata={"latent_stats": {"mean": [0.1], "std": [1.2]}},
    )


def test_save_and_load_round_trip(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_one(store)
    loaded = store.load(saved.ref)
    assert loaded.version == saved.version and loaded.stage == "autoencoder"
    tensors = loaded.load_tensors()
    assert torch.equal(tensors["w"], torch.full((3, 2), 1.0)) and torch.equal(tensors["b"], torch.arange(4))
    assert loaded.config() == {"model": {"ch": 8}, "value": 1.0}
    assert loaded.manifest["latent_stats"] == {"mean": [0.1], "std": [1.2]}
    assert loaded.manifest["data_fingerprint"] == "abc"
    assert set(loaded.manifest["files"]) == {"weights.safetensors", "config.yaml"}
    assert "torch" in loaded.manifest["libraries"]


def test_same_content_gives_same_version_and_different_content_another(tmp_path):
    store = ArtifactStore(tmp_path)
    first, again, other = save_one(store, 1.0), save_one(store, 1.0), save_one(store, 2.0)
    assert first.version == again.version != other.version
    assert len(store.list("autoencoder")) == 2


def test_references_latest_prefix_and_errors(tmp_path):
    store = ArtifactStore(tmp_path)
    first = save_one(store, 1.0)
    second = save_one(store, 2.0)
    # make "created" differ deterministically
    store.update_manifest(first, created="2000-01-01T00:00:00Z")
    assert store.load("autoencoder@latest").version == second.version
    assert store.load(f"autoencoder@{first.version[:6]}").version == first.version
    assert store.load(str(first.path)).version == first.version
    with pytest.raises(ArtifactError, match="no autoencoder artifact matches"):
        store.resolve("autoencoder@zzzz")
    with pytest.raises(ArtifactError, match="no diffusion artifacts"):
        store.resolve("diffusion@latest")
    with pytest.raises(ArtifactError, match="a latents artifact is needed"):
        store.resolve(first.ref, stage="latents")


def test_corrupted_weights_file_is_refused(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_one(store)
    weights = saved.path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip one byte of a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch .*weights.safetensors"):
        store.load(saved.ref)


def test_missing_file_is_refused(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_one(store)
    (saved.path / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        store.load(saved.ref)


def test_failed_save_leaves_no_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 (any failure: the test is about what it leaves behind)
        store.save("autoencoder", tensors={"weights.safetensors": {"w": "not a tensor"}}, config={})
    assert store.list() == []
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "autoencoder").iterdir())


def test_lineage_follows_parents(tmp_path):
    store = ArtifactStore(tmp_path)
    ae = save_one(store)
    latents = save_one(store, 3.0, stage="latents", parents={"autoencoder": ae.ref})
    model = save_one(store, 4.0, stage="diffusion", parents={"latents": latents.ref})
    assert [a.stage for a in store.lineage(model)] == ["diffusion", "latents", "autoencoder"]
    manifest = json.loads((model.path / "manifest.json").read_text())
    assert manifest["parents"] == {"latents": latents.ref}


def test_update_manifest_merges_metrics(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_one(store)
    store.update_manifest(saved, metrics={"recon_test": {"psnr": 30.0}})
    updated = store.update_manifest(store.load(saved.ref), metrics={"recon_train": {"psnr": 31.0}})
    assert updated.manifest["metrics"] == {"recon_test": {"psnr": 30.0}, "recon_train": {"psnr": 31.0}}
    assert store.load(saved.ref).manifest["metrics"]["recon_test"]["psnr"] == 30.0


def test_stored_files_and_folders_get_the_umask_modes_not_private_temp_modes(tmp_path):
    # A store shared by a group: mkstemp/mkdtemp make 0600/0700 entries, which the rename kept.
    previous = os.umask(0o022)
    try:
        store = ArtifactStore(tmp_path)
        saved = save_one(store)
        assert stat.S_IMODE(saved.path.stat().st_mode) == 0o755
        for file in saved.path.iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name
        store.update_manifest(saved, metrics={"psnr": 30.0})  # rewritten through write_atomic
        assert stat.S_IMODE((saved.path / "manifest.json").stat().st_mode) == 0o644
        os.umask(0o027)
        write_atomic(tmp_path / "note.json", b"{}")
        assert stat.S_IMODE((tmp_path / "note.json").stat().st_mode) == 0o640
    finally:
        os.umask(previous)


def test_mapped_safetensors_equal_the_loaded_ones_for_every_dtype(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "i64": torch.arange(9).reshape(3, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    mapped = map_safetensors(tmp_path / "t.safetensors")
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert mapped.keys() == loaded.keys()
    for key, value in loaded.items():
        assert mapped[key].dtype == value.dtype and torch.equal(mapped[key], value), key


def test_mapped_safetensors_handle_misaligned_data_and_refuse_truncation(tmp_path):
    # Hand-made file: 3 bytes of u8 put the float32 tensor at an offset that is not a multiple of 4.
    header = json.dumps(
        {
            "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
        }
    ).encode()
    data = bytes([1, 2, 3]) + torch.tensor([1.5, -2.0]).numpy().tobytes()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    mapped = map_safetensors(path)
    assert mapped["a"].tolist() == [1, 2, 3] and mapped["b"].tolist() == [1.5, -2.0]
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ArtifactError, match=r"odd.safetensors is truncated: tensor b ends at byte"):
        map_safetensors(path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(ArtifactError, match="is not a safetensors file"):
        map_safetensors(path)

"""The artifact store's integrity: sealed manifests, damaged and legacy artifacts, `ldm artifacts list/show/verify`."""

import hashlib
import json

import pytest
import torch

from conftest import cli
from ldm.artifacts import ArtifactError, ArtifactStore


def save_diffusion_like(store, value=1.0, std=1.5, seconds=12.3):
    """A small artifact with the manifest fields a diffusion stage writes."""
    return store.save(
        "diffusion",
        tensors={"weights.safetensors": {"w": torch.full((2, 3), value)}},
        config={"model": {"hidden_size": 8}, "diffusion": {"objective": "ddpm"}},
        parents={"latents": "latents@0123456789ab"},
        data_fingerprint="fmnist-train",
        metadata={
            "autoencoder": "autoencoder@ba9876543210",
            "latent_stats": {"mode": "global", "mean": [0.0], "std": [std]},
            "latent_shape": [4, 8, 8],
            "num_classes": 10,
            "training": {"steps": 2, "seconds_this_run": seconds},
        },
    )


def edit_manifest(artifact, **fields):
    file = artifact.path / "manifest.json"
    manifest = json.loads(file.read_text())
    manifest.update(fields)
    file.write_text(json.dumps(manifest, indent=2))
    return manifest


def assert_no_traceback(result):
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("verify", [True, False])
def test_edited_latent_stats_are_refused_on_load_even_without_verifying_files(tmp_path, verify):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, latent_stats={"mode": "global", "mean": [0.0], "std": [3.0]})
    with pytest.raises(
        ArtifactError,
        match=rf"diffusion/{saved.version} is damaged: manifest.json was changed after "
        rf"saving .*no longer hash to its version {saved.version}.*restore the file",
    ):
        store.load(saved.ref, verify=verify)


def test_edited_parents_are_refused_on_load(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, parents={"latents": "latents@ffffffffffff"})
    with pytest.raises(ArtifactError, match="manifest.json was changed after saving"):
        store.load(saved.ref, verify=False)


def test_edited_config_yaml_is_refused_on_load_even_without_verifying_files(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    (saved.path / "config.yaml").write_text("model:\n  hidden_size: 8\ndiffusion:\n  objective: flow\n")
    with pytest.raises(ArtifactError, match="config.yaml was changed after saving"):
        store.load(saved.ref, verify=False)
    with pytest.raises(ArtifactError, match="config.yaml was changed after saving"):
        store.load(saved.ref)


def test_removing_manifest_format_from_an_edited_manifest_does_not_pass(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    manifest = edit_manifest(saved, latent_stats={"mode": "global", "mean": [0.0], "std": [3.0]})
    del manifest["manifest_format"]
    (saved.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest.json was changed after saving"):
        store.load(saved.ref, verify=False)


def test_unsealed_fields_may_be_edited_by_hand(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, created="1999-01-01T00:00:00Z", training={"steps": 1}, metrics={"fid": 3.0})
    assert store.load(saved.ref).manifest["training"] == {"steps": 1}


def test_a_folder_renamed_away_from_its_version_is_damaged(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    saved.path.rename(saved.path.parent / "mymodel")
    with pytest.raises(ArtifactError, match=f"diffusion/mymodel is damaged: the folder holds version {saved.version}"):
        store.load("diffusion@mymodel")


def test_an_artifact_moved_to_another_stage_folder_is_damaged(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    (tmp_path / "latents").mkdir()
    saved.path.rename(tmp_path / "latents" / saved.version)
    with pytest.raises(ArtifactError, match="holds a diffusion artifact; move it to diffusion/"):
        store.load(f"latents@{saved.version}")


def test_same_result_saved_twice_gives_the_same_version_though_its_training_time_differs(tmp_path):
    store = ArtifactStore(tmp_path)
    first = save_diffusion_like(store, seconds=12.3)
    again = save_diffusion_like(store, seconds=45.6)
    assert again.version == first.version and len(store.list("diffusion")) == 1


def test_same_files_with_other_sealed_fields_are_another_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    first = save_diffusion_like(store, std=1.5)
    other = save_diffusion_like(store, std=3.0)
    assert other.version != first.version
    assert store.load(other.ref).manifest["latent_stats"]["std"] == [3.0]


def test_saving_the_same_result_again_replaces_a_damaged_copy(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, latent_stats={"mode": "global", "mean": [0.0], "std": [3.0]})
    again = save_diffusion_like(store)
    assert again.version == saved.version
    assert store.load(saved.ref).manifest["latent_stats"]["std"] == [1.5]


def test_metadata_may_not_overwrite_what_save_writes(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(ArtifactError, match="metadata must not set parents, version"):
        store.save("diffusion", tensors={}, config={}, metadata={"version": "abc", "parents": {}})


def test_update_manifest_refuses_a_sealed_key_and_names_it(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    with pytest.raises(ArtifactError, match=f"cannot change latent_stats, parents of {saved.ref}: sealed"):
        store.update_manifest(saved, latent_stats={"std": [3.0]}, parents={}, metrics={"fid": 3.0})
    assert "metrics" not in store.load(saved.ref).manifest  # nothing was written


def test_update_manifest_writes_the_manifest_on_disk_not_an_edited_copy_in_memory(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    saved.manifest["latent_stats"] = {"std": [3.0]}
    store.update_manifest(saved, metrics={"fid": 3.0})
    loaded = store.load(saved.ref)
    assert loaded.manifest["latent_stats"]["std"] == [1.5] and loaded.manifest["metrics"] == {"fid": 3.0}


def test_list_cli_shows_good_artifacts_and_a_broken_line_for_a_non_json_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    good = save_diffusion_like(store, 1.0)
    bad = save_diffusion_like(store, 2.0)
    (bad.path / "manifest.json").write_text("{ not json")
    result = cli(store, "artifacts", "list")
    assert_no_traceback(result)
    assert result.exit_code == 0
    assert good.ref in result.output
    assert f"BROKEN diffusion/{bad.version}: manifest.json cannot be read as JSON" in result.output
    assert store.list() == [store.load(good.ref)]


def test_list_cli_survives_unsealed_fields_of_any_type(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, created=None, metrics=[1, 2])
    result = cli(store, "artifacts", "list")
    assert_no_traceback(result)
    assert result.exit_code == 0 and saved.ref in result.output


def test_resolve_by_prefix_names_a_folder_without_manifest_as_damaged(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    (saved.path / "manifest.json").unlink()
    with pytest.raises(
        ArtifactError,
        match=f"diffusion/{saved.version} is damaged: no manifest.json in the folder; "
        "delete the folder or restore the file",
    ):
        store.resolve(f"diffusion@{saved.version[:6]}")


def test_latest_with_only_a_broken_folder_says_damaged_not_missing(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    (saved.path / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=f"every diffusion folder .* is damaged: diffusion/{saved.version}") as err:
        store.load("diffusion@latest")
    assert "no diffusion artifacts" not in str(err.value)


def test_latest_picks_a_sound_artifact_over_a_newer_damaged_one(tmp_path):
    store = ArtifactStore(tmp_path)
    old = save_diffusion_like(store, 1.0)
    store.update_manifest(old, created="2000-01-01T00:00:00Z")
    newer = save_diffusion_like(store, 2.0)
    edit_manifest(newer, num_classes=3)
    assert store.load("diffusion@latest").version == old.version


def test_show_cli_on_a_broken_artifact_is_a_clean_error(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, num_classes=3)
    result = cli(store, "artifacts", "show", saved.ref, "--no-verify")
    assert_no_traceback(result)
    assert result.exit_code == 1 and "manifest.json was changed after saving" in result.output


def test_verify_cli_says_ok_and_exits_0_for_a_sound_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    result = cli(store, "artifacts", "verify", saved.ref)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == [saved.ref, "ok"]
    assert "1 checked" in result.output and "1 ok, 0 legacy, 0 failed" in result.output


def test_verify_cli_fails_with_exit_1_for_an_edited_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    edit_manifest(saved, latent_stats={"mode": "global", "mean": [0.0], "std": [3.0]})
    result = cli(store, "artifacts", "verify", saved.ref)
    assert_no_traceback(result)
    assert result.exit_code == 1
    assert (
        f"diffusion/{saved.version}" in result.output
        and "FAILED: manifest.json was changed after saving" in result.output
    )


def test_verify_cli_without_ref_reports_every_folder_and_exits_1_when_one_failed(tmp_path):
    store = ArtifactStore(tmp_path)
    good = save_diffusion_like(store, 1.0)
    corrupt = save_diffusion_like(store, 2.0)
    broken = save_diffusion_like(store, 3.0)
    weights = corrupt.path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    (broken.path / "manifest.json").unlink()
    result = cli(store, "artifacts", "verify")
    assert_no_traceback(result)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert f"{good.ref} ok" in [" ".join(line.split()) for line in lines]
    assert any(line.startswith(corrupt.ref) and "FAILED: checksum mismatch" in line for line in lines)
    assert any(line.startswith(f"diffusion/{broken.version}") and "FAILED: no manifest.json" in line for line in lines)
    assert lines[-1].startswith("3 checked") and lines[-1].endswith("1 ok, 0 legacy, 2 failed")


def test_legacy_manifest_with_the_files_only_version_loads_and_verify_says_legacy(tmp_path):
    store = ArtifactStore(tmp_path)
    saved = save_diffusion_like(store)
    manifest = json.loads((saved.path / "manifest.json").read_text())
    del manifest["manifest_format"]
    # The version before manifests were sealed: sha256 over the files' sorted "name:sha256" lines alone.
    lines = "".join(f"{name}:{info['sha256']}\n" for name, info in sorted(manifest["files"].items()))
    manifest["version"] = hashlib.sha256(lines.encode()).hexdigest()[:12]
    (saved.path / "manifest.json").write_text(json.dumps(manifest))
    legacy_path = saved.path.rename(saved.path.parent / manifest["version"])
    loaded = store.load(f"diffusion@{manifest['version']}")
    assert loaded.path == legacy_path and not loaded.sealed
    result = cli(store, "artifacts", "verify")
    assert result.exit_code == 0, result.output
    assert "legacy: manifest fields not sealed" in result.output and "0 ok, 1 legacy, 0 failed" in result.output

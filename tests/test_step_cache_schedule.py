"""Step-caching schedules are sealed: bound to their model, setting and fraction, refused when edited or moved."""

import json

import pytest
from click.testing import CliRunner

from conftest import DIT, assert_one_line_failure, save_autoencoder, save_dit
from ldm.artifacts import ArtifactStore, seal_record
from ldm.caching import CacheSchedule
from ldm.diffusion.schedules import DiffusionConfig
from pipeline import LatentDiffusionPipeline
from stages.cli import main

FLOW = DiffusionConfig(objective="flow", learn_sigma=False)
SAMPLE = ["--n", "2", "--sampler", "flow-heun", "--steps", "6", "--cfg", "2", "--no-images"]
ENTRY = "cache-flow-heun-6-cfg2-f0.3"  # 11 network calls x 2 blocks: 0.3 of them is 7 skips


def save_flow_dit(store: ArtifactStore, seed: int) -> str:
    """Store a random autoencoder and a random flow DiT of its latents, both drawn with `seed`; return the DiT's ref."""
    return save_dit(store, DIT, FLOW, seed, save_autoencoder(store, seed).ref).ref


@pytest.fixture
def store(tmp_path):
    """A store of its own for each test (they edit its manifest) with one flow DiT."""
    store = ArtifactStore(tmp_path / "store")
    save_flow_dit(store, 0)
    return store


def model_ref(store):
    return store.list("diffusion")[0].ref


def sample(store, out, *extra):
    return CliRunner().invoke(
        main,
        [
            "--store",
            str(store.root),
            "sample",
            "--model",
            model_ref(store),
            *SAMPLE,
            "--out",
            str(out),
            "--cache-fraction",
            "0.3",
            *extra,
        ],
    )


def calibrated(store, tmp_path):
    """Calibrate ENTRY through `ldm sample` and return the manifest's path."""
    result = sample(store, tmp_path / "first")
    assert result.exit_code == 0 and f"calibrated {ENTRY}" in result.output, result.output
    return store.load(model_ref(store)).path / "manifest.json"


def edit_entry(manifest_path, edit):
    """Edit the manifest's metrics by hand, as a user with a text editor would (metrics are unsealed)."""
    manifest = json.loads(manifest_path.read_text())
    edit(manifest.setdefault("metrics", {}))
    manifest_path.write_text(json.dumps(manifest, indent=2))


def half_the_blocks(record):
    """Skip every block at every other call after the first.

    That is 50% of the evaluations of 11 calls x 2 blocks, minus one call.
    """
    return [[call, block] for call in range(1, record["calls"], 2) for block in range(record["depth"])]


def assert_refused(result, *phrases):
    assert_one_line_failure(result, *phrases, last=False, status=1)


@pytest.mark.timeout(60)
def test_a_calibrated_schedule_is_stored_sealed_to_its_model_and_fraction_and_reused(store, tmp_path):
    record = json.loads(calibrated(store, tmp_path).read_text())["metrics"][ENTRY]
    assert record["artifact"] == model_ref(store).split("@")[1] and record["cache_fraction"] == 0.3
    assert len(record["sealed_sha256"]) == 64 and len(record["skips"]) == 7
    again = sample(store, tmp_path / "again")
    assert again.exit_code == 0 and f"the stored schedule {ENTRY}" in again.output, again.output
    verified = CliRunner().invoke(main, ["--store", str(store.root), "artifacts", "verify"])
    assert verified.exit_code == 0 and "2 ok" in verified.output, verified.output


@pytest.mark.timeout(60)
def test_a_schedule_edited_to_skip_half_is_refused_and_verify_fails_naming_it(store, tmp_path, monkeypatch):
    path = calibrated(store, tmp_path)
    edit_entry(path, lambda metrics: metrics[ENTRY].update(skips=half_the_blocks(metrics[ENTRY])))
    calls = []
    monkeypatch.setattr(LatentDiffusionPipeline, "sample", lambda *args, **kwargs: calls.append(1))
    assert_refused(sample(store, tmp_path / "edited"), model_ref(store), ENTRY, "after it was stored")
    assert calls == [] and not (tmp_path / "edited").exists()
    verified = CliRunner().invoke(main, ["--store", str(store.root), "artifacts", "verify"])
    assert verified.exit_code == 1 and "1 failed" in verified.output, verified.output
    assert f"{model_ref(store)}" in verified.output and f"FAILED: metrics['{ENTRY}']" in verified.output


@pytest.mark.timeout(60)
def test_an_edited_schedule_whose_seal_was_recomputed_is_still_refused_for_skipping_more_than_its_fraction(
    store, tmp_path
):
    path = calibrated(store, tmp_path)
    artifact = store.load(model_ref(store))

    def forge(metrics):
        record = {k: v for k, v in metrics[ENTRY].items() if k not in ("artifact", "sealed_sha256")}
        metrics[ENTRY] = seal_record(artifact, ENTRY, {**record, "skips": half_the_blocks(record)})

    edit_entry(path, forge)
    assert_refused(sample(store, tmp_path / "forged"), model_ref(store), ENTRY, "--cache-fraction 0.3")
    assert not (tmp_path / "forged").exists()


@pytest.mark.timeout(60)
def test_a_schedule_moved_to_the_entry_of_another_fraction_is_never_reused(store, tmp_path):
    path = calibrated(store, tmp_path)
    edit_entry(path, lambda metrics: metrics.update({ENTRY.replace("f0.3", "f0.2"): metrics[ENTRY]}))
    assert_refused(
        sample(store, tmp_path / "moved", "--cache-fraction", "0.2"),
        ENTRY.replace("f0.3", "f0.2"),
        "after it was stored",
    )


@pytest.mark.timeout(60)
def test_a_schedule_copied_from_another_model_is_refused(store, tmp_path):
    path = calibrated(store, tmp_path)
    other_store = ArtifactStore(tmp_path / "other")
    other = other_store.load(save_flow_dit(other_store, 1))
    record = json.loads(path.read_text())["metrics"][ENTRY]
    edit_entry(other.path / "manifest.json", lambda metrics: metrics.update({ENTRY: record}))
    result = CliRunner().invoke(
        main,
        [
            "--store",
            str(other_store.root),
            "sample",
            "--model",
            other.ref,
            *SAMPLE,
            "--out",
            str(tmp_path / "copied"),
            "--cache-fraction",
            "0.3",
        ],
    )
    assert_refused(result, other.ref, ENTRY, "after it was stored")


@pytest.mark.parametrize(
    "entry, phrase",
    [
        ("junk", "a JSON object"),
        ([[1, 0]], "a JSON object"),
        ({"calls": "eleven", "depth": 2, "skips": [[1, 0]]}, "calls must be an integer"),
        ({"calls": 11, "depth": 2, "skips": "1,0"}, "skips must be a list of [call, block] pairs"),
        ({"calls": 11, "depth": 2, "skips": [[1, "x"]]}, "skips must be a list of [call, block] pairs"),
        ({"calls": 11, "depth": 2, "skips": [[1]]}, "skips must be a list of [call, block] pairs"),
        ({"calls": 11, "depth": 2, "skips": [[1, 5]]}, "outside calls"),
        ({"calls": 11, "skips": [[1, 0]]}, "depth must be an integer"),
        ({"calls": 11, "depth": 2, "skips": [[1, 0]], "extrapolate": "yes"}, "extrapolate must be true or false"),
    ],
)
@pytest.mark.timeout(60)
def test_a_malformed_schedule_entry_is_refused_in_one_line_naming_the_artifact_and_the_entry(
    store, tmp_path, entry, phrase
):
    path = store.load(model_ref(store)).path / "manifest.json"
    edit_entry(path, lambda metrics: metrics.update({ENTRY: entry}))
    assert_refused(sample(store, tmp_path / "out"), model_ref(store), ENTRY, "malformed", phrase)
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_an_unsealed_schedule_stored_before_sealing_is_calibrated_anew_not_reused(store, tmp_path):
    path = store.load(model_ref(store)).path / "manifest.json"
    unsealed = {"calls": 11, "depth": 2, "skips": half_the_blocks({"calls": 11, "depth": 2}), "extrapolate": False}
    edit_entry(path, lambda metrics: metrics.update({ENTRY: unsealed}))
    result = sample(store, tmp_path / "out")
    assert result.exit_code == 0 and f"calibrated {ENTRY}" in result.output and "not sealed" in result.output, (
        result.output
    )
    record = json.loads(path.read_text())["metrics"][ENTRY]
    assert len(record["skips"]) == 7 and "sealed_sha256" in record


def test_schedule_from_dict_reads_what_to_dict_wrote_and_ignores_the_record_fields_around_it():
    schedule = CacheSchedule(11, 2, ((1, 0), (3, 1)), extrapolate=True)
    assert CacheSchedule.from_dict({**schedule.to_dict(), "artifact": "abc", "cache_fraction": 0.1}) == schedule
    with pytest.raises(ValueError, match=r"skips must be a list of \[call, block\] pairs"):
        CacheSchedule.from_dict({"calls": 11, "depth": 2, "skips": [[1, 0.5]]})
    with pytest.raises(ValueError, match="calls must be an integer >= 1, got True"):
        CacheSchedule.from_dict({"calls": True, "depth": 2, "skips": []})

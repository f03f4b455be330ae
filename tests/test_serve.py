"""`ldm serve`: request checks, dynamic batching that changes no image, hostile requests, the page in a browser."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.serving import (
    Batcher,
    GenerateRequest,
    Job,
    QueueFull,
    RequestError,
    ServeLimits,
    parse_generate,
    png_base64,
)
from pipeline import LatentDiffusionPipeline

pytest.importorskip("starlette", reason="the [serve] extra: pip install -e '.[serve]'")
from starlette.testclient import TestClient  # noqa: E402

from stages.serve import check_exposure, create_app  # noqa: E402

LIMITS = ServeLimits(max_n=4, max_steps=8, max_batch=16, window_ms=5, queue_size=8)
GOOD = {"labels": [3], "n": 2, "steps": 3, "seed": 5}


def decode_pngs(encoded: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in encoded])


def pngs_of(images: torch.Tensor) -> np.ndarray:
    return decode_pngs(png_base64(images))


@pytest.fixture(scope="module")
def client(store):
    with TestClient(create_app(store, LIMITS)) as client:
        yield client


# ------------------------------------------------------------------------------------------ request checks


@pytest.mark.parametrize(
    "body, message",
    [
        ({**GOOD, "n": 5}, "n must be in 1..4"),
        ({**GOOD, "steps": -1}, "steps must be in 1..8"),
        ({**GOOD, "steps": 2.5}, "steps must be an integer"),
        ({**GOOD, "model": "../../etc/passwd"}, "model must be a stored DiT's reference"),
        ({**GOOD, "model": "/tmp/store/diffusion/abc"}, "model must be a stored DiT's reference"),
        ({**GOOD, "labels": [1, 2, 3]}, "3 labels for n = 2 images"),
        ({**GOOD, "labels": ["1"]}, "labels must be a non-empty list of integers"),
        ({"n": 1}, "give either labels"),
        ({**GOOD, "prompts": ["a bag"]}, "give either labels"),
        ({**GOOD, "guidance": 99}, "guidance must be a number in 0..20"),
        ({**GOOD, "sampler": "magic"}, "unknown sampler 'magic'"),
        ({**GOOD, "path": "/etc"}, "unknown field(s) 'path'"),
        ([1, 2], "the body must be a JSON object"),
    ],
)
def test_parse_generate_refuses_bad_fields_with_the_fix(body, message):
    with pytest.raises(RequestError, match=None) as raised:
        parse_generate(body, LIMITS, "diffusion@latest")
    assert raised.value.status == 400 and message in raised.value.message


def test_parse_generate_gives_one_seed_and_label_per_image():
    request = parse_generate({**GOOD, "n": 3}, LIMITS, "diffusion@latest")
    assert request.labels == (3, 3, 3) and request.seeds == [5, 6, 7] and request.model == "diffusion@latest"


def test_only_localhost_goes_without_a_token():
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    check_exposure("0.0.0.0", "secret")
    with pytest.raises(ValueError, match="pass --token"):
        check_exposure("0.0.0.0", None)


# ------------------------------------------------------------------------------------------ batching


class FakePipe:
    """Stands in for a pipeline: records each sampler run's seeds, and can hold a run until released."""

    def __init__(self, calls: int = 4):
        self.runs, self.calls = [], calls
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def settings(self, settings=None, **options):
        return SimpleNamespace(sampler="ddim", num_steps=self.calls)

    def sample(self, labels, settings, seeds, on_model_call, **options):
        self.runs.append(list(seeds))
        self.started.set()
        for _ in range(self.calls):
            self.release.wait(5)
            on_model_call()
        return torch.tensor(seeds, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)


def fake_job(pipe, seed: int, n: int = 1, loop=None) -> Job:
    request = GenerateRequest("diffusion@latest", n, seed, 4, None, None, "float32", labels=(0,) * n)
    return Job(request, request.batch_key("diffusion@x"), pipe, (loop or asyncio.get_running_loop()).create_future())


def test_requests_within_the_window_share_one_run_and_get_their_own_images():
    async def scenario():
        pipe = FakePipe()
        batcher = Batcher(ServeLimits(max_n=4, max_batch=16, window_ms=100))
        jobs = [fake_job(pipe, seed, n) for seed, n in ((10, 2), (20, 1), (30, 3))]
        results = await asyncio.gather(*(batcher.submit(job) for job in jobs))
        await batcher.stop()
        return pipe, jobs, results

    pipe, jobs, results = asyncio.run(scenario())
    assert pipe.runs == [[10, 11, 20, 30, 31, 32]]
    assert [result[:, 0, 0, 0].tolist() for result in results] == [[10, 11], [20], [30, 31, 32]]
    assert all(job.batch == (3, 6) for job in jobs)


def test_without_batching_each_request_runs_alone_in_order():
    async def scenario():
        pipe = FakePipe()
        batcher = Batcher(ServeLimits(max_n=4, max_batch=16, window_ms=100, batching=False))
        await asyncio.gather(*(batcher.submit(fake_job(pipe, seed)) for seed in (1, 2, 3)))
        await batcher.stop()
        return pipe

    assert asyncio.run(scenario()).runs == [[1], [2], [3]]


def test_a_batch_stops_at_max_batch_images():
    async def scenario():
        pipe = FakePipe()
        batcher = Batcher(ServeLimits(max_n=4, max_batch=5, window_ms=50))
        await asyncio.gather(*(batcher.submit(fake_job(pipe, seed, 2)) for seed in (0, 10, 20)))
        await batcher.stop()
        return pipe

    assert asyncio.run(scenario()).runs == [[0, 1, 10, 11], [20, 21]]


def test_a_full_queue_refuses_with_retry_after_and_dropped_work_is_never_sampled():
    async def scenario():
        pipe = FakePipe()
        pipe.release.clear()
        batcher = Batcher(ServeLimits(max_n=4, max_batch=16, window_ms=0, queue_size=2))
        running = asyncio.ensure_future(batcher.submit(fake_job(pipe, 1)))
        await asyncio.to_thread(pipe.started.wait, 5)  # job 1 is sampling; the next two wait
        dropped, kept = fake_job(pipe, 2), fake_job(pipe, 3)
        waiting = [asyncio.ensure_future(batcher.submit(job)) for job in (dropped, kept)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(fake_job(pipe, 4))
        waiting[0].cancel()  # its caller went away
        pipe.release.set()
        await running
        await waiting[1]
        await batcher.stop()
        return pipe, refused.value

    pipe, refused = asyncio.run(scenario())
    assert refused.status == 503 and refused.retry_after >= 1 and "retry in" in refused.message
    assert pipe.runs == [[1], [3]]


def test_a_batch_whose_callers_all_left_stops_at_its_next_network_call():
    async def scenario():
        pipe = FakePipe(calls=50)
        pipe.release.clear()
        batcher = Batcher(ServeLimits(max_n=4, max_batch=16, window_ms=0))
        work = asyncio.ensure_future(batcher.submit(fake_job(pipe, 1)))
        await asyncio.to_thread(pipe.started.wait, 5)
        work.cancel()
        pipe.release.set()
        await asyncio.sleep(0.2)
        await batcher.stop()
        return batcher

    assert asyncio.run(scenario()).batches == 1  # it ended (abandoned) rather than hanging or failing


def test_batched_images_equal_each_request_sampled_alone(store):
    pipe = LatentDiffusionPipeline.from_artifacts("diffusion@latest", store=store)
    requests = [
        parse_generate({"labels": [1], "n": 2, "steps": 4, "seed": 7, "guidance": 2}, LIMITS, "diffusion@latest"),
        parse_generate(
            {"labels": [4, 9, 0], "n": 3, "steps": 4, "seed": 100, "guidance": 2}, LIMITS, "diffusion@latest"
        ),
    ]

    async def scenario():
        batcher = Batcher(ServeLimits(max_n=4, max_batch=16, window_ms=200))
        loop = asyncio.get_running_loop()
        jobs = [Job(r, r.batch_key("x"), pipe, loop.create_future()) for r in requests]
        images = await asyncio.gather(*(batcher.submit(job) for job in jobs))
        await batcher.stop()
        return jobs, images

    jobs, images = asyncio.run(scenario())
    assert jobs[0].batch == (2, 5)
    for request, batched in zip(requests, images):
        alone = pipe.sample(list(request.labels), num_steps=4, guidance_scale=2, seed=request.seed)
        difference = np.abs(pngs_of(batched).astype(int) - pngs_of(alone).astype(int))
        assert difference.max() <= 1  # within 1/255


def test_pipeline_seeds_give_each_image_its_own_draw(pipe):
    together = pipe.sample([2, 2, 5], num_steps=3, seeds=[40, 3, 17])
    alone = torch.cat([pipe.sample([label], num_steps=3, seed=seed) for label, seed in ((2, 40), (2, 3), (5, 17))])
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="seeds must be 3 integers >= 0"):
        pipe.sample([2, 2, 5], num_steps=3, seeds=[1, 2])


# ------------------------------------------------------------------------------------------ HTTP


def test_generate_returns_the_pipelines_images_as_png(client, store):
    response = client.post("/v1/generate", json=GOOD)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["seeds"] == [5, 6] and body["settings"]["labels"] == [3, 3] and body["model"].startswith("diffusion@")
    pipe = LatentDiffusionPipeline.from_artifacts("diffusion@latest", store=store)
    expected = pngs_of(pipe.sample([3, 3], num_steps=3, seed=5))
    assert np.abs(decode_pngs(body["images"]).astype(int) - expected.astype(int)).max() <= 1


def test_hostile_requests_get_clear_4xx_and_the_server_keeps_serving(client):
    refusals = [
        (client.post("/v1/generate", content=b"{not json"), 400, "not JSON"),
        (client.post("/v1/generate", json={**GOOD, "n": 1000}), 400, "n must be in"),
        (client.post("/v1/generate", json={**GOOD, "steps": -3}), 400, "steps must be in"),
        (client.post("/v1/generate", json={**GOOD, "model": "../artifacts/diffusion"}), 400, "stored DiT's reference"),
        (client.post("/v1/generate", json={**GOOD, "model": "diffusion@ffffffffffff"}), 404, "no such model"),
        (client.post("/v1/generate", json={**GOOD, "labels": [10]}), 422, "out of range"),
        (client.post("/v1/generate", json={**GOOD, "labels": None, "prompts": ["a bag"]}), 422, "class-conditional"),
        (client.post("/v1/generate", content=b"[" + b"1," * 40000 + b"1]"), 413, "over 65536 bytes"),
        (client.get("/v1/generate"), 405, ""),
    ]
    for response, status, message in refusals:
        assert response.status_code == status, response.text
        if message:
            assert message in response.json()["error"]
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.post("/v1/generate", json=GOOD).status_code == 200


def test_a_flood_over_the_queue_gets_503_and_the_server_recovers(store):
    limits = ServeLimits(max_n=4, max_steps=50, max_batch=4, window_ms=0, queue_size=2)
    with TestClient(create_app(store, limits)) as client:
        assert client.post("/v1/generate", json=GOOD).status_code == 200  # the model is loaded
        statuses, threads = [], []

        def call():
            response = client.post("/v1/generate", json={**GOOD, "n": 4, "steps": 50})
            statuses.append((response.status_code, response.headers.get("retry-after")))

        for _ in range(12):
            threads.append(threading.Thread(target=call))
            threads[-1].start()
        for thread in threads:
            thread.join(120)
        assert {status for status, _ in statuses} == {200, 503}
        assert all(retry is not None and int(retry) >= 1 for status, retry in statuses if status == 503)
        assert client.post("/v1/generate", json=GOOD).status_code == 200


def test_streamed_generate_reports_progress_then_the_result(client):
    with client.stream("POST", "/v1/generate", json={**GOOD, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = [
        (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
        for block in text.strip().split("\n\n")
    ]
    names = [name for name, _ in events]
    assert names[0] == "progress" and names[-1] == "result" and names.count("progress") >= 4
    done = [data["done"] for name, data in events[1:-1]]
    assert done == sorted(done) and done[-1] == events[1][1]["total"]
    assert len(events[-1][1]["images"]) == 2


def test_models_lists_the_store_and_the_token_guards_the_api(store):
    with TestClient(create_app(store, LIMITS, token="s3cret")) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.post("/v1/generate", json=GOOD).status_code == 401
        listed = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()
        assert client.get("/healthz").status_code == 200
    assert [m["ref"] for m in listed["models"]] == [a.ref for a in store.list("diffusion")]
    assert listed["models"][0]["conditioning"] == "labels" and listed["models"][0]["num_classes"] == 10


def test_the_page_is_served(client):
    response = client.get("/")
    assert response.status_code == 200 and 'id="generate"' in response.text and "/v1/generate" in response.text


# ------------------------------------------------------------------------------------------ the page in a browser


@pytest.mark.slow
def test_the_page_in_a_headless_browser_makes_a_grid(store, tmp_path):
    pytest.importorskip("selenium", reason="selenium (the [dev] extra)")
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("a headless browser: apt-get install chromium chromium-driver")
    import uvicorn

    from bench.serve import drive_page, free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store, LIMITS), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        shown = drive_page(f"http://127.0.0.1:{port}", "7", 4, 4, tmp_path / "page.png", timeout=60)
    finally:
        server.should_exit = True
        thread.join(10)
    assert shown["widths"] == [32, 32, 32, 32]  # four decoded PNGs; the random autoencoder makes 32x32 images
    assert "4 images" in shown["status"]
    assert Image.open(tmp_path / "page.png").size[0] >= 500  # the screenshot was written and decodes

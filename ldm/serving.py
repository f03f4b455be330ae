"""Sampling for many callers at once: request checks, loaded models kept, and dynamic batching.

Every image of our samplers depends on its own seed alone, whatever else is in its batch, so requests
from different callers that share a model and the settings of one sampler run (sampler, steps,
guidance, precision) can be sampled as one batch and each caller still gets exactly the images it
would get alone (to float rounding: a matmul over a bigger batch may round differently). A `Batcher`
takes requests into a bounded list of pending work, lets the oldest one wait a short window for
companions, runs each batch in a worker thread and hands every caller its own images; work whose
caller has gone is dropped before it runs, and a batch whose callers have all gone stops at its next
network call. `stages/serve.py` puts this behind HTTP; nothing here knows about HTTP but the status
codes its errors carry.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ldm.artifacts import ArtifactError, ArtifactStore
from ldm.generation import SAMPLERS, model_calls
from ldm.images import to_pil

# A request names a stored DiT by reference only: its stage, "@", then "latest" or a version's hex digits.
# Nothing a caller sends can name a file.
MODEL_REF = re.compile(r"diffusion@(latest|[0-9a-f]{4,64})")
PRECISIONS = ("float32", "int8", "bf16")
MAX_PROMPT_CHARS = 300


class RequestError(Exception):
    """A request refused with an HTTP status and a message that says what to change."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for and how requests are batched."""

    max_n: int = 16  # images per request
    max_steps: int = 100  # sampler steps per request
    max_batch: int = 64  # images sampled in one batch
    window_ms: float = 25.0  # how long the oldest pending request waits for companions
    queue_size: int = 64  # requests pending (waiting or running); beyond it: 503 with Retry-After
    models: int = 2  # pipelines kept loaded, least recently used dropped
    batching: bool = True  # False: one request per sampler run, in arrival order

    def __post_init__(self) -> None:
        for name in ("max_n", "max_steps", "max_batch", "queue_size", "models"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch < self.max_n:
            raise ValueError(f"max_batch ({self.max_batch}) must hold one request of max_n ({self.max_n}) images")
        if self.window_ms < 0:
            raise ValueError(f"window_ms must be >= 0, got {self.window_ms}")


@dataclass(frozen=True)
class GenerateRequest:
    """One caller's images: by class labels or prompts (one per image), with the settings of the sampler run."""

    model: str
    n: int
    seed: int
    steps: int
    sampler: str | None
    guidance: float | None
    precision: str
    labels: tuple[int, ...] | None = None
    prompts: tuple[str, ...] | None = None
    negative_prompt: str = ""

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    def batch_key(self, resolved_model: str) -> tuple:
        """Requests with equal keys can share one sampler run."""
        return (resolved_model, self.precision, self.sampler, self.steps, self.guidance)

    def settings(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "n": self.n,
            "seed": self.seed,
            "steps": self.steps,
            "sampler": self.sampler,
            "guidance": self.guidance,
            "precision": self.precision,
            **({"labels": list(self.labels)} if self.labels is not None else {}),
            **({"prompts": list(self.prompts), "negative_prompt": self.negative_prompt} if self.prompts else {}),
        }


FIELDS = {"model", "labels", "prompts", "negative_prompt", "n", "steps", "sampler", "guidance", "seed", "precision"}


def _integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer, got {type(value).__name__} {str(value)[:40]!r}")
    if not low <= value <= high:
        raise RequestError(400, f"{name} must be in {low}..{high}, got {value}")
    return value


def parse_generate(body: Any, limits: ServeLimits, default_model: str) -> GenerateRequest:
    """Check a decoded JSON body of POST /v1/generate; RequestError (400) naming the first problem."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - FIELDS - {"stream"})
    if unknown:
        raise RequestError(
            400, f"unknown field(s) {', '.join(map(repr, unknown))[:200]}; known: {', '.join(sorted(FIELDS))}"
        )
    model = body.get("model", default_model)
    if not isinstance(model, str) or not MODEL_REF.fullmatch(model):
        raise RequestError(
            400,
            f"model must be a stored DiT's reference, diffusion@latest or diffusion@<version>; got {str(model)[:80]!r}",
        )
    n = _integer(body, "n", 1, 1, limits.max_n)
    steps = _integer(body, "steps", min(20, limits.max_steps), 1, limits.max_steps)
    seed = _integer(body, "seed", 0, 0, 2**31 - 1)
    sampler = body.get("sampler")
    if sampler is not None and sampler not in SAMPLERS:
        raise RequestError(400, f"unknown sampler {str(sampler)[:40]!r}; one of {', '.join(SAMPLERS)}")
    guidance = body.get("guidance")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= 20:
            raise RequestError(400, f"guidance must be a number in 0..20, got {str(guidance)[:40]!r}")
        guidance = float(guidance)
    precision = body.get("precision", "float32")
    if precision not in PRECISIONS:
        raise RequestError(400, f"precision must be one of {', '.join(PRECISIONS)}, got {str(precision)[:40]!r}")
    labels, prompts = body.get("labels"), body.get("prompts")
    if (labels is None) == (prompts is None):
        raise RequestError(
            400, "give either labels (class models) or prompts (text models), one per image or one for all"
        )
    if labels is not None:
        labels = _per_image(labels, n, "labels", lambda v: isinstance(v, int) and not isinstance(v, bool), "integers")
    if prompts is not None:
        prompts = _per_image(
            prompts, n, "prompts", lambda v: isinstance(v, str) and len(v) <= MAX_PROMPT_CHARS, "strings"
        )
    negative = body.get("negative_prompt", "")
    if not isinstance(negative, str) or len(negative) > MAX_PROMPT_CHARS:
        raise RequestError(400, f"negative_prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
    return GenerateRequest(model, n, seed, steps, sampler, guidance, precision, labels, prompts, negative)


def _per_image(values: Any, n: int, name: str, check: Callable[[Any], bool], what: str) -> tuple:
    if not isinstance(values, list) or not values or not all(check(v) for v in values):
        extra = f" of at most {MAX_PROMPT_CHARS} characters" if name == "prompts" else ""
        raise RequestError(400, f"{name} must be a non-empty list of {what}{extra}")
    if len(values) not in (1, n):
        raise RequestError(400, f"{len(values)} {name} for n = {n} images: give one for all or one per image")
    return tuple(values * n if len(values) == 1 else values)


def png_base64(images: torch.Tensor) -> list[str]:
    """PNG files (base64) of images (N, C, H, W) in [-1, 1], as `to_pil` quantises them."""
    encoded = []
    for picture in to_pil(images):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


# ------------------------------------------------------------------------------------------ loaded models


class ModelPool:
    """Pipelines loaded from a store, at most `size` of them, the least recently used dropped first."""

    def __init__(self, store: ArtifactStore, size: int, device: str = "cpu"):
        self.store, self.size, self.device = store, size, device
        self._loaded: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, ref: str) -> str:
        """The concrete reference `ref` names now (latest moves); RequestError 404 when there is none."""
        try:
            artifact = self.store.load(ref, stage="diffusion", verify=False)
        except ArtifactError as err:
            raise RequestError(404, f"no such model {ref}: {str(err)[:200]}; GET /v1/models lists them") from None
        return artifact.ref

    def get(self, ref: str, precision: str):
        """The pipeline of the concrete reference `ref` at `precision`, loaded (files checksum-verified) once."""
        from pipeline import LatentDiffusionPipeline

        key = (ref, precision)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            try:
                pipe = LatentDiffusionPipeline.from_artifacts(
                    ref, store=self.store, device=self.device, precision=precision
                )
            except (ArtifactError, ValueError) as err:
                raise RequestError(422, f"{ref} cannot be served at {precision}: {str(err)[:300]}") from None
            if pipe.sample_rate is not None:
                raise RequestError(422, f"{ref} makes sound; this server makes images")
            self._loaded[key] = pipe
            while len(self._loaded) > self.size:
                self._loaded.popitem(last=False)
            return pipe

    def loaded(self) -> list[str]:
        with self._lock:
            return [f"{ref} ({precision})" for ref, precision in self._loaded]


def check_conditions(pipe, request: GenerateRequest) -> None:
    """RequestError 422 when the request's labels or prompts do not fit the model (before it joins a batch)."""
    if pipe.takes_prompts and request.prompts is None:
        raise RequestError(422, f"{request.model} takes text prompts: send prompts, not labels")
    if not pipe.takes_prompts and request.labels is None:
        raise RequestError(422, f"{request.model} is class-conditional: send labels, not prompts")
    if request.labels is not None:
        bad = [label for label in request.labels if not 0 <= label < pipe.num_classes]
        if bad:
            raise RequestError(
                422, f"label {bad[0]} is out of range: {request.model} has classes 0..{pipe.num_classes - 1}"
            )
    try:
        pipe.settings(None, **sampler_options(request))
    except (ValueError, TypeError) as err:
        raise RequestError(422, f"settings refused by {request.model}: {str(err)[:300]}") from None


def sampler_options(request: GenerateRequest) -> dict[str, Any]:
    options: dict[str, Any] = {"num_steps": request.steps}
    if request.sampler is not None:
        options["sampler"] = request.sampler
    if request.guidance is not None:
        options["guidance_scale"] = request.guidance
    return options


# ------------------------------------------------------------------------------------------ batching


@dataclass(eq=False)
class Job:
    """A request waiting for, or in, a batch; `future` gets its images (N, C, H, W) or an exception."""

    request: GenerateRequest
    key: tuple
    pipe: Any
    future: asyncio.Future
    progress: Callable[[int, int], None] | None = None  # (calls done, calls in all) as the batch runs
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when its batch began sampling
    batch: tuple[int, int] = (0, 0)  # requests and images of its batch

    @property
    def gone(self) -> bool:
        return self.future.done()  # cancelled by a caller that went away (or already answered)


class QueueFull(RequestError):
    def __init__(self, pending: int, retry_after: float):
        super().__init__(
            503, f"the server holds {pending} requests, its limit; retry in {retry_after:.0f} s", retry_after
        )


class _Abandoned(Exception):
    """Raised in a running batch whose callers have all gone: stops it at the next network call."""


class Batcher:
    """Collects jobs and samples those that share a batch key together, oldest first.

    `submit` adds a job (QueueFull beyond `queue_size` pending) and returns its images. One worker task
    takes the oldest pending job, waits up to `window_ms` for more jobs of its key unless `max_batch`
    images are already there, and samples the jobs of that key (in arrival order, up to max_batch
    images) as one `pipe.sample` call in a thread, each image with its own request's seed.
    """

    def __init__(self, limits: ServeLimits):
        self.limits = limits
        self.pending: list[Job] = []
        self.batches = 0  # sampler runs so far
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._seconds_per_image = 0.5  # running estimate, for Retry-After

    def start(self) -> None:
        if self._worker is None:
            self._wake = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def submit(self, job: Job) -> torch.Tensor:
        """The job's images; QueueFull when `queue_size` requests are pending. Cancelling the await drops the job."""
        self.start()
        if len(self.pending) >= self.limits.queue_size:
            waiting = sum(j.request.n for j in self.pending)
            raise QueueFull(len(self.pending), max(1.0, math.ceil(waiting * self._seconds_per_image)))
        self.pending.append(job)
        self._wake.set()
        try:
            return await job.future
        finally:
            if job in self.pending and job.future.done():
                self.pending.remove(job)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                self.pending = [job for job in self.pending if not job.gone]
                if not self.pending:
                    break
                first = self.pending[0]
                if self.limits.batching and self._images_of(first.key) < self.limits.max_batch:
                    await asyncio.sleep(self.limits.window_ms / 1000)
                batch = self._take(first)
                if batch:
                    await self._sample(batch)

    def _images_of(self, key: tuple) -> int:
        return sum(job.request.n for job in self.pending if job.key == key and not job.gone)

    def _take(self, first: Job) -> list[Job]:
        """Remove and return the jobs of first's key, oldest first, up to max_batch images (without batching: one)."""
        batch, images = [], 0
        for job in list(self.pending):
            if job.gone or job.key != first.key:
                continue
            if batch and (not self.limits.batching or images + job.request.n > self.limits.max_batch):
                break
            batch.append(job)
            images += job.request.n
            self.pending.remove(job)
        return batch

    async def _sample(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        count = sum(job.request.n for job in batch)
        for job in batch:
            job.started, job.batch = started, (len(batch), count)
        try:
            images = await asyncio.to_thread(sample_batch, batch, loop)
        except _Abandoned:
            return
        except Exception as err:  # every caller of the batch hears why, the server goes on
            for job in batch:
                if not job.gone:
                    job.future.set_exception(RequestError(500, f"sampling failed: {type(err).__name__}: {err}"))
            return
        finally:
            self.batches += 1
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * (time.perf_counter() - started) / count
        start = 0
        for job in batch:
            part = images[start : start + job.request.n]
            start += job.request.n
            if not job.gone:
                job.future.set_result(part)


def sample_batch(batch: list[Job], loop: asyncio.AbstractEventLoop | None = None) -> torch.Tensor:
    """Images (sum of n, C, H, W) of the batch's jobs, in order, each image from its own request's seed."""
    first = batch[0]
    pipe, request = first.pipe, first.request
    labels = [label for job in batch for label in (job.request.labels or [0] * job.request.n)]
    seeds = [seed for job in batch for seed in job.request.seeds]
    prompts = negatives = None
    if request.prompts is not None:
        prompts = [prompt for job in batch for prompt in job.request.prompts]
        negatives = [job.request.negative_prompt for job in batch for _ in range(job.request.n)]
    settings = pipe.settings(None, **sampler_options(request))
    calls, total = [0], model_calls(settings.sampler, settings.num_steps)

    def on_model_call() -> None:
        if all(job.gone for job in batch):
            raise _Abandoned
        calls[0] += 1
        for job in batch:
            if job.progress is not None and loop is not None and not job.gone:
                loop.call_soon_threadsafe(job.progress, calls[0], total)

    with torch.inference_mode():
        return pipe.sample(
            None if prompts is not None else labels,
            settings,
            prompts=prompts,
            negative_prompts=negatives,
            seeds=seeds,
            batch_size=len(seeds),
            on_model_call=on_model_call,
        )


def describe_models(store: ArtifactStore) -> list[dict[str, Any]]:
    """The store's diffusion artifacts for GET /v1/models: reference, what conditions them, key numbers."""
    described = []
    for artifact in store.list("diffusion"):
        config = artifact.config()
        model = config.get("model", {})
        metrics = artifact.manifest.get("metrics")
        numbers = {}
        if isinstance(metrics, dict):
            for name, values in metrics.items():
                if isinstance(values, dict):
                    numbers[name] = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        described.append(
            {
                "ref": artifact.ref,
                "created": artifact.manifest.get("created"),
                "conditioning": "prompts" if model.get("text_dim") else "labels",
                "num_classes": model.get("num_classes"),
                "objective": config.get("diffusion", {}).get("objective"),
                "depth": model.get("depth"),
                "hidden_size": model.get("hidden_size"),
                "parents": artifact.parents,
                "metrics": numbers,
            }
        )
    return described

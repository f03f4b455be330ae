"""`ldm serve`: the sampling pipeline over HTTP, requests batched dynamically, and a page to try a model.

    GET  /              the page (ldm/static/serve.html, shipped in the package; no build step, no CDN)
    GET  /healthz       {"status": "ok", "pending": ..., "loaded": [...]}
    GET  /v1/models     the store's diffusion artifacts with their key numbers
    POST /v1/generate   {"labels" or "prompts", "n", "steps", "sampler", "guidance", "seed", "model", "precision"}
                        -> {"images": [base64 PNG], "seeds", "settings", "model", "batch", "timing"};
                        with "stream": true, server-sent events: "progress" {done, total}, then "result".

Starlette on uvicorn (optional extra `[serve]`). Binds to 127.0.0.1 by default; any other host needs a
bearer token (`--token`), which every /v1 call must then send. Bodies over 64 KiB are refused (413), bad
JSON and bad fields answer 400, a model that cannot take the request 422, an unknown model 404, and a
full queue 503 with Retry-After. Models load once and stay (an LRU of `--models`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import time
from importlib import resources
from typing import Any

from ldm.artifacts import ArtifactStore
from ldm.serving import (
    Batcher,
    GenerateRequest,
    Job,
    ModelPool,
    RequestError,
    ServeLimits,
    check_conditions,
    describe_models,
    parse_generate,
    png_base64,
)

MAX_BODY_BYTES = 64 * 1024
SERVE_HINT = "ldm serve needs the optional extra: pip install -e '.[serve]' (starlette, uvicorn)"


class MissingExtra(RuntimeError):
    """The optional extra [serve] is not installed."""


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token: anyone who can reach the port could use the CPU."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not token:
        raise ValueError(f"--host {host} is reachable from other machines: pass --token (a bearer token) as well")


def create_app(
    store: ArtifactStore,
    limits: ServeLimits | None = None,
    default_model: str = "diffusion@latest",
    token: str | None = None,
    device: str = "cpu",
):
    """The ASGI application: routes above, one `Batcher` and one `ModelPool` for its lifetime."""
    try:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
        from starlette.routing import Route
    except ImportError as err:
        raise MissingExtra(SERVE_HINT) from err

    limits = limits or ServeLimits()
    pool = ModelPool(store, limits.models, device)
    batcher = Batcher(limits)

    def error(err: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(int(err.retry_after))} if err.retry_after else None
        return JSONResponse({"error": err.message}, status_code=err.status, headers=headers)

    def authorised(request: Request) -> bool:
        if not token:
            return True
        sent = request.headers.get("authorization", "")
        return hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())

    async def read_json(request: Request) -> Any:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise RequestError(413, f"the body is over {MAX_BODY_BYTES} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise RequestError(413, f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"the body is not JSON: {err}") from None

    async def page(request: Request) -> HTMLResponse:
        html = resources.files("ldm").joinpath("static/serve.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {"status": "ok", "pending": len(batcher.pending), "batches": batcher.batches, "loaded": pool.loaded()}
        )

    async def models(request: Request) -> JSONResponse:
        if not authorised(request):
            return error(RequestError(401, "send Authorization: Bearer <token>"))
        listed = await asyncio.to_thread(describe_models, store)
        return JSONResponse({"default": default_model, "models": listed, "limits": limits.__dict__})

    async def prepare(request: Request) -> tuple[GenerateRequest, Job, bool]:
        if not authorised(request):
            raise RequestError(401, "send Authorization: Bearer <token>")
        body = await read_json(request)
        parsed = parse_generate(body, limits, default_model)
        stream = isinstance(body, dict) and body.get("stream") is True
        resolved = await asyncio.to_thread(pool.resolve, parsed.model)
        pipe = await asyncio.to_thread(pool.get, resolved, parsed.precision)
        check_conditions(pipe, parsed)
        job = Job(parsed, parsed.batch_key(resolved), pipe, asyncio.get_running_loop().create_future())
        return parsed, job, stream

    def answer(parsed: GenerateRequest, job: Job, images) -> dict[str, Any]:
        now = time.perf_counter()
        return {
            "model": job.key[0],
            "images": png_base64(images),
            "seeds": parsed.seeds,
            "settings": parsed.settings(),
            "batch": {"requests": job.batch[0], "images": job.batch[1]},
            "timing": {
                "queued_ms": round((job.started - job.submitted) * 1000, 1),
                "total_ms": round((now - job.submitted) * 1000, 1),
            },
        }

    async def until_disconnected(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def generate(request: Request):
        try:
            parsed, job, stream = await prepare(request)
        except RequestError as err:
            return error(err)
        if stream:
            return StreamingResponse(
                events(parsed, job), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
            )
        work = asyncio.ensure_future(batcher.submit(job))
        gone = asyncio.ensure_future(until_disconnected(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the caller went away: its job is dropped, or its batch stops if it was alone
            job.future.cancel()
            work.cancel()
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        gone.cancel()
        try:
            images = work.result()
        except RequestError as err:
            return error(err)
        return JSONResponse(answer(parsed, job, images))

    async def events(parsed: GenerateRequest, job: Job):
        updates: asyncio.Queue = asyncio.Queue()
        job.progress = lambda done, total: updates.put_nowait({"done": done, "total": total})
        work = asyncio.ensure_future(batcher.submit(job))
        try:
            yield _event("progress", {"done": 0, "total": None, "pending": len(batcher.pending)})
            while not work.done():
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield _event("progress", getter.result())
                else:
                    getter.cancel()
            try:
                yield _event("result", answer(parsed, job, work.result()))
            except RequestError as err:
                yield _event("error", {"error": err.message, "status": err.status})
        finally:  # a closed stream (the caller went away) drops the job
            if not work.done():
                job.future.cancel()
                work.cancel()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.stop()

    routes = [
        Route("/", page),
        Route("/healthz", health),
        Route("/v1/models", models),
        Route("/v1/generate", generate, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.batcher, app.state.pool = batcher, pool
    return app


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def serve(
    store: ArtifactStore,
    host: str,
    port: int,
    limits: ServeLimits,
    default_model: str,
    token: str | None,
    device: str = "cpu",
) -> None:
    """Run the server until interrupted."""
    check_exposure(host, token)
    try:
        import uvicorn
    except ImportError as err:
        raise MissingExtra(SERVE_HINT) from err
    app = create_app(store, limits, default_model, token, device)
    print(f"serving {store.root} at http://{host}:{port}/ (default model {default_model}); Ctrl-C stops")
    uvicorn.run(app, host=host, port=port, log_level="warning")

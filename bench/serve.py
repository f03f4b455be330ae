"""`ldm serve` under load: images per second and latency with dynamic batching on and off, and a soak.

Starts `ldm serve` as a child process on localhost for each mode, then N client threads each send
requests back to back (one image each unless --n) for --seconds, after a warm-up request. Prints,
per mode, images per second, p50 and p95 latency, the status codes seen, and the ratio batched /
one-at-a-time, measured side by side in one run.

--soak S floods a server whose queue holds --queue-size requests with twice as many clients for S
seconds and samples the server's resident memory once a second: it prints the status codes (503s are
the intended answer to the flood, anything else is an error) and the growth of resident memory from
the first minute's median to the last minute's.

--screenshot PATH drives the page at / in headless chromium (Debian's chromium and chromium-driver,
selenium): picks a class, generates, waits for the grid, saves a screenshot.

    python bench/serve.py --store artifacts --model diffusion@latest --clients 16 --seconds 30 --steps 10
    python bench/serve.py --store artifacts --soak 300
    python bench/serve.py --store artifacts --screenshot docs/images/serve-page.png --labels 7 --n 8
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(store: str, model: str, *options: str):
    """An `ldm serve` child process on a free localhost port; yields (base url, process)."""
    port = free_port()
    command = [sys.executable, "-c", "from stages.cli import main; main()", "--store", store, "serve"]
    command += ["--model", model, "--port", str(port), *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.time() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ldm serve exited: {process.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("ldm serve did not answer within 60 s")
            time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        process.wait(30)


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def load(url: str, clients: int, seconds: float, body: dict) -> dict:
    """`clients` threads sending `body` back to back for `seconds`: latencies of the 200s and every status."""
    import httpx

    latencies, statuses, lock = [], collections.Counter(), threading.Lock()
    stop = time.perf_counter() + seconds

    def client(index: int) -> None:
        with httpx.Client(timeout=300) as http:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                try:
                    response = http.post(f"{url}/v1/generate", json={**body, "seed": 1000 * index})
                    status = response.status_code
                except httpx.TransportError as err:
                    status = type(err).__name__
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(time.perf_counter() - start)
                if status == 503:
                    time.sleep(0.05)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "latencies": latencies, "statuses": dict(statuses)}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else float("nan"))


def throughput(args: argparse.Namespace) -> None:
    body = {"labels": [args.labels], "n": args.n, "steps": args.steps, "guidance": args.cfg}
    print(
        f"ldm serve on localhost, {args.model} in {args.store}: {args.clients} clients, requests of {args.n} "
        f"image(s), {args.steps} steps, cfg {args.cfg}, {args.seconds:g} s per mode; {os.cpu_count()} CPUs"
    )
    rows = {}
    for mode, options in (("one at a time", ["--no-batching"]), ("batched", ["--window-ms", str(args.window_ms)])):
        options += ["--max-batch", str(args.max_batch), "--queue-size", str(max(args.clients, 16))]
        with running_server(args.store, args.model, *options) as (url, _):
            load(url, 1, 0, body)  # loads the model; one request
            result = load(url, args.clients, args.seconds, body)
        images = len(result["latencies"]) * args.n
        rows[mode] = images / result["elapsed"]
        print(
            f"  {mode:<14} {rows[mode]:7.2f} images/s  p50 {percentile(result['latencies'], 50):6.2f} s  "
            f"p95 {percentile(result['latencies'], 95):6.2f} s  statuses {result['statuses']}",
            flush=True,
        )
    print(f"  batched / one at a time: {rows['batched'] / rows['one at a time']:.2f}x images per second")


def soak(args: argparse.Namespace) -> None:
    body = {"labels": [args.labels], "n": args.n, "steps": args.steps, "guidance": args.cfg}
    clients = 2 * args.queue_size
    options = ["--queue-size", str(args.queue_size), "--max-batch", str(args.max_batch)]
    print(f"soak: {clients} clients against a queue of {args.queue_size} for {args.soak:g} s, {args.steps} steps")
    with running_server(args.store, args.model, *options) as (url, process):
        load(url, 1, 0, body)
        samples, done = [], threading.Event()

        def watch() -> None:
            while not done.wait(1.0):
                samples.append((time.perf_counter(), resident_mib(process.pid)))

        watcher = threading.Thread(target=watch)
        watcher.start()
        result = load(url, clients, args.soak, body)
        done.set()
        watcher.join()
    t0 = samples[0][0]
    first = [mib for t, mib in samples if t - t0 < 60]
    last = [mib for t, mib in samples if samples[-1][0] - t < 60]
    growth = statistics.median(last) / statistics.median(first) - 1
    errors = {status: count for status, count in result["statuses"].items() if status not in (200, 503)}
    print(f"  statuses {result['statuses']}; errors other than 503: {errors or 'none'}")
    first, last = statistics.median(first), statistics.median(last)
    print(
        f"  resident memory: first minute {first:.1f} MiB, last minute {last:.1f} MiB (growth {100 * growth:+.1f}%), "
        f"peak {max(mib for _, mib in samples):.1f} MiB"
    )


def drive_page(url: str, labels: str, n: int, steps: int, screenshot: Path | None = None, timeout: float = 120) -> dict:
    """Open the page at `url` in headless chromium, generate n images of class `labels`; return what it shows."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        raise RuntimeError("a headless browser is needed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,760"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
        for field, value in (("labels", labels), ("n", str(n)), ("steps", str(steps))):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, timeout).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#grid img")) == n)
        widths = browser.execute_script(
            "return [...document.querySelectorAll('#grid img')].map(i => i.complete && i.naturalWidth)"
        )
        status = browser.find_element(By.ID, "status").text
        if screenshot is not None:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(screenshot))
        return {"widths": widths, "status": status}
    finally:
        browser.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="artifacts")
    parser.add_argument("--model", default="diffusion@latest")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--labels", default="7", help="the class of every request (the page: comma-separated)")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--window-ms", type=float, default=25.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=16, help="for --soak")
    parser.add_argument("--soak", type=float, default=0, help="seconds of a flood over the queue (0: no soak)")
    parser.add_argument("--screenshot", type=Path, default=None, help="drive the page and save a screenshot here")
    args = parser.parse_args()
    if args.screenshot is not None:
        with running_server(args.store, args.model) as (url, _):
            print(json.dumps(drive_page(url, args.labels, args.n, args.steps, args.screenshot)))
        return
    args.labels = int(args.labels)
    if args.soak:
        soak(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()

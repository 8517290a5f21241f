"""A load test of `medseg serve` on loopback: N uploads at concurrency C, each followed to its mask.

Starts `medseg serve RUN` as its own process on 127.0.0.1, then C client threads each upload a PNG, poll the job
until it is done and download the mask, until N uploads are through. Records every HTTP status, the round-trip
latency (median and 95th percentile) and the server's resident memory after the warm-up (the first fifth of the
uploads) and at the end.

    python benchmarks/serve_load.py RUN IMAGE.png [--uploads 200] [--concurrency 8] [--json OUT] [--docs]

With --docs the figures go to docs/benchmarks/serve_load.json and the SERVE_LOAD section of docs/benchmarks.md;
tests/test_serve_safety.py runs it with a small network and checks the same figures.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# clients ask for a job's status this often, as the page does (0.3 s); polling every 20 ms, eight clients sent
# 99,000 status requests in one run and took the cores from the network (0.45 uploads/s instead of 0.97)
POLL_SECONDS = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def call(request, statuses: Counter, lock: threading.Lock) -> bytes | None:
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            body, status = answer.read(), answer.status
    except urllib.error.HTTPError as error:
        body, status = None, error.code
    with lock:
        statuses[status] += 1
    return body


def submit(base: str, image: Path, statuses: Counter, lock: threading.Lock) -> bytes | None:
    """Upload once accepted: a 429 (the server's limits on uploads at once, per client, and on the queue) is
    retried after its Retry-After, as a well-behaved client does; every answer is counted."""
    while True:
        try:
            with urllib.request.urlopen(upload_request(base, image), timeout=120) as answer:
                body, status, wait = answer.read(), answer.status, 0.0
        except urllib.error.HTTPError as error:
            body, status, wait = None, error.code, float(error.headers.get("Retry-After") or 1)
        with lock:
            statuses[status] += 1
        if status != 429:
            return body
        time.sleep(wait)


def upload_request(base: str, image: Path) -> urllib.request.Request:
    boundary = "medsegload"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{image.name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return urllib.request.Request(f"{base}/api/v1/segment", data=body, method="POST",
                                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def run_load(run: str, image: Path, uploads: int, concurrency: int) -> dict:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "medseg", "serve", run, "--port", str(port), "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{base}/api/v1/model", timeout=1).read()
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        statuses, lock, latencies, memory = Counter(), threading.Lock(), [], {}
        todo = iter(range(uploads))
        warm_up = max(1, uploads // 5)

        def client() -> None:
            for index in todo:  # a shared iterator: each upload is taken once
                started = time.perf_counter()
                job = json.loads(submit(base, image, statuses, lock) or b"{}")
                while job.get("status") in ("queued", "running"):
                    time.sleep(POLL_SECONDS)
                    job = json.loads(call(f"{base}/api/v1/jobs/{job['id']}", statuses, lock) or b"{}")
                if job.get("status") == "done":
                    call(base + job["results"]["mask.png"], statuses, lock)
                with lock:
                    latencies.append(time.perf_counter() - started)
                    if len(latencies) == warm_up:
                        memory["after_warm_up_mib"] = rss_mib(server.pid)

        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        memory["end_mib"] = rss_mib(server.pid)
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    latencies.sort()
    return {"uploads": uploads, "concurrency": concurrency, "requests": sum(statuses.values()),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "server_errors": sum(v for k, v in statuses.items() if k >= 500),
            "retried_429": statuses.get(429, 0),
            "seconds": round(seconds, 1), "uploads_per_second": round(uploads / seconds, 2),
            "latency_median_s": round(statistics.median(latencies), 3),
            "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
            "rss_after_warm_up_mib": round(memory["after_warm_up_mib"], 1), "rss_end_mib": round(memory["end_mib"], 1),
            "rss_growth": round(memory["end_mib"] / memory["after_warm_up_mib"] - 1, 4), "server_output": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("image", type=Path)
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args()
    result = run_load(args.run, args.image, args.uploads, args.concurrency)
    print(json.dumps({k: v for k, v in result.items() if k != "server_output"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.docs:
        import platform

        sys.path.insert(0, str(Path(__file__).parent))
        from docs_section import write_section

        (ROOT / "docs" / "benchmarks" / "serve_load.json").write_text(json.dumps(result, indent=2))
        r = result
        write_section("SERVE_LOAD", "benchmarks/serve_load.py", [
            f"Machine: {platform.machine()}, CPU; the server and the clients share it. Run: `{args.run}`; image: "
            f"`{args.image.name}`.", "",
            "| uploads | concurrency | HTTP requests | statuses | 5xx | uploads/s | round trip median / p95 (s) | "
            "server memory after warm-up -> end (MiB) | growth |", "|---|---|---|---|---|---|---|---|---|",
            f"| {r['uploads']} | {r['concurrency']} | {r['requests']} | {r['statuses']} | {r['server_errors']} | "
            f"{r['uploads_per_second']} | {r['latency_median_s']} / {r['latency_p95_s']} | "
            f"{r['rss_after_warm_up_mib']} -> {r['rss_end_mib']} | {100 * r['rss_growth']:+.1f}% |", "",
            f"Command: `python benchmarks/serve_load.py {args.run} {args.image} --docs`."],
            "`medseg serve` under load (loopback)")


if __name__ == "__main__":
    main()

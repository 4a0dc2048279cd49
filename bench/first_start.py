"""`make demo` on a fresh data directory: how long until the page answers, and until the sample
product is registered (what an operator waits for on the first start).

    .venv/bin/python bench/first_start.py [--out bench/first_start.json] [--threads 2]

Runs ``inspector serve --sample --data-dir <empty temp dir>`` (the command ``make demo`` runs; the
sample dataset cache under ~/.cache/inspector is reused, as on any start after the first
install), polls the page, and reads the server's console for the staged registration progress and
"sample product ready". Writes a JSON file with the timings, every progress line with its time,
the CPU count and the 1-minute load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _screenshot(url: str, path: Path) -> str:
    """The page as a first-time user sees it while the sample product registers."""
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            pg = b.new_page(viewport={"width": 1440, "height": 900})
            pg.goto(url)
            pg.locator("#startup").wait_for()
            pg.wait_for_timeout(2500)  # a banner refresh or two
            text = pg.locator("#startup").inner_text()
            pg.screenshot(path=str(path))
            b.close()
        return text
    except Exception as exc:  # noqa: BLE001 - the timing is the point; a screenshot is a bonus
        return f"no screenshot: {exc}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "first_start.json")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the server (OMP_NUM_THREADS)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--screenshot", type=Path, help="also save what the page shows mid-registration (Chromium)")
    args = ap.parse_args()

    port = free_port()
    lines: list[tuple[float, str]] = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="first-start-") as tmp:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                   OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "inspector.cli", "serve", "--sample", "--data-dir",
                                 str(Path(tmp) / "data"), "--port", str(port)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()

        def reader():
            for line in proc.stdout:
                lines.append((time.perf_counter() - t0, line.rstrip()))
                if "sample product ready" in line or "registering the sample product failed" in line.lower():
                    ready.set()

        threading.Thread(target=reader, daemon=True).start()
        t_page = None
        shot = None
        try:
            while time.perf_counter() - t0 < args.timeout and not ready.is_set():
                if t_page is None:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                            if r.status == 200:
                                t_page = time.perf_counter() - t0
                    except OSError:
                        pass
                if t_page is not None and args.screenshot and shot is None \
                        and any("fold" in s for _, s in lines):
                    shot = _screenshot(f"http://127.0.0.1:{port}/", args.screenshot)
                if proc.poll() is not None:
                    break
                time.sleep(0.25)
            t_ready = time.perf_counter() - t0 if ready.is_set() else None
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    progress = [{"t_s": round(t, 2), "line": s} for t, s in lines if s.startswith("sample registration")]
    reg = next((float(m.group(1)) for _, s in lines if (m := re.search(r"ready after ([\d.]+) s", s))), None)
    out = {
        "command": "inspector serve --sample (fresh data dir)",
        "page_answers_s": None if t_page is None else round(t_page, 2),
        "sample_ready_s": None if t_ready is None else round(t_ready, 2),
        "registration_s": reg,
        "progress_updates": len(progress),
        "banner_mid_registration": shot,
        "progress": progress,
        "cpus": os.cpu_count(), "torch_threads": args.threads, "machine": platform.processor() or platform.machine(),
        "load_avg_1m_before": round(load0, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "progress"}, indent=2))


if __name__ == "__main__":
    main()

"""The app's figures on the Shapes model, measured as a user meets them: `python app.py` in a fresh
process, requests through `gradio_client`, a screenshot from Chromium.

Targets (issue 15, 2 CPU cores): startup to ready <= 20 s; generate + heatmap + top features <= 1 s
median per request; a steered pair <= 2 s median (it is three generations now: the plain image, the
steered one and the one with the dictionary's reconstruction spliced in, for the spliced-in error).

- startup: from starting the process to the first HTTP 200 on "/" (the packaged pipeline, the first
  site's SAE and the labels are loaded by then; other dictionaries load on first use);
- generate: `/generate` wall time at the client (SAE at transformer_blocks.3.image, all steps, the
  default ranking), after one untimed request; the handler's own time is read from its stats line;
- steer: `/steer` wall time at the client (two features of the first image, own strengths, the last four
  steps), after one untimed request; the spliced image's share is read from the stats line.

    python benchmarks/app.py --runs 10 --screenshot benchmarks/results/app.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "app.json"
SITE = "transformer_blocks.3.image"
PROMPTS = [
    "a red circle at the top left on a white background",
    "a large blue square at the center on a black background",
    "a small yellow triangle at the bottom right on a gray background",
]
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"app.py was not ready after {timeout:.0f} s")


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def screenshot(url: str, path: Path) -> None:
    """Generate, pick a feature, click a pixel, search labels, steer two features with a painted region."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(url)
            page.locator("#prompt textarea").fill(PROMPTS[0])
            page.locator("#generate").click()
            expect(page.locator("#stats")).to_contain_text("FVU on this image", timeout=60_000)
            for row in (2, 3):  # the first two features of the table into the steering list
                page.locator(f'#top_features [role=row][aria-rowindex="{row}"] [role=gridcell]').first.click()
                expect(page.locator("#steer_add textarea")).not_to_have_value("", timeout=30_000)
                page.locator("#steer_add_button").click()
                expect(page.locator(f"#strength_{row - 2}")).to_be_visible(timeout=30_000)
            page.locator("#strength_1 input[type=number]").fill("-6")
            page.locator("#strength_1 input[type=number]").press("Tab")
            page.locator("#image img").click(position={"x": 80, "y": 80})
            expect(page.locator('#at_pixel [role=row][aria-rowindex="2"]')).to_be_visible(timeout=30_000)
            page.locator("#search textarea").fill("red")
            page.locator("#search textarea").press("Enter")
            expect(page.locator('#found [role=row][aria-rowindex="2"]')).to_be_visible(timeout=30_000)
            page.locator('#region button[aria-label="Brush"]').first.click()
            box = page.locator("#region canvas").first.bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
            page.mouse.down()
            for i in range(1, 11):
                page.mouse.move(box["x"] + box["width"] * (0.3 + 0.02 * i), box["y"] + box["height"] * 0.35)
            page.mouse.up()
            page.locator("#steer").click()
            expect(page.locator("#steer_stats")).to_contain_text("image MSE", timeout=60_000)
            page.screenshot(path=path, full_page=True)
        finally:
            browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="timed requests of each kind")
    ap.add_argument("--timeout", type=float, default=120, help="seconds to wait for the app to be ready")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON written here")
    ap.add_argument("--screenshot", type=Path, default=None, help="also save a full-page screenshot here")
    args = ap.parse_args()

    from gradio_client import Client

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log
        )
        try:
            wait_ready(url, proc, args.timeout)
            startup = time.perf_counter() - start
            print(f"startup to ready: {startup:.1f} s")
            client = Client(url, verbose=False)

            def generate(i):
                return client.predict(PROMPTS[i % len(PROMPTS)], i, SITE, "SAE", 0, 7, -1, 0.55,
                                      "unusual for this image", api_name="/generate")  # fmt: skip

            top = [row[0] for row in generate(0)[3]["data"][:2]]
            features = f"{top[0]}: 4, {top[1]}: -4"

            def steer(i):
                prompt = PROMPTS[i % len(PROMPTS)]
                return client.predict(
                    prompt, i, SITE, "SAE", features, 4, "add", 4, 7, None, api_name="/steer"
                )

            steer(0)
            gen_s, gen_handler_ms, steer_s, steer_handler_ms, spliced_ms = [], [], [], [], []
            for i in range(1, args.runs + 1):
                t = time.perf_counter()
                stats = generate(i)[2]
                gen_s.append(time.perf_counter() - t)
                gen_handler_ms.append(float(re.findall(r"(\d+) ms", stats)[-1]))
            for i in range(1, args.runs + 1):
                t = time.perf_counter()
                stats = steer(i)[3]
                steer_s.append(time.perf_counter() - t)
                total, spliced = re.search(r"(\d+) ms \(spliced image (\d+) ms\)", stats).groups()
                steer_handler_ms.append(float(total))
                spliced_ms.append(float(spliced))
            if args.screenshot is not None:
                screenshot(url, args.screenshot)
                print(f"screenshot: {args.screenshot}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(["python", "benchmarks/app.py", *sys.argv[1:]]),
        "startup_to_ready_s": startup,
        "generate_s": summary(gen_s),
        "generate_handler_ms": summary(gen_handler_ms),
        "steer_s": summary(steer_s),
        "steer_handler_ms": summary(steer_handler_ms),
        "steer_spliced_image_ms": summary(spliced_ms),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    median = {k: v["median"] for k, v in result.items() if isinstance(v, dict)}
    print(
        f"generate + heatmap + top features: median {median['generate_s']:.2f} s (handler "
        f"{median['generate_handler_ms']:.0f} ms); steered pair: median {median['steer_s']:.2f} s (spliced "
        f"image {median['steer_spliced_image_ms']:.0f} ms of it); written to {args.out}"
    )


if __name__ == "__main__":
    main()

"""Take the README's screenshot of the playground (docs/img/playground.png) with Playwright.

    python docs/playground_screenshot.py --config configs/embedded3.yaml --bundle runs/embedded3/bundle

Serves the bundle on a local Ray (as ``jobs/serve.py`` does, on a free port, no token), opens the page in the
system's headless Chromium (``apt-get install chromium``; Playwright downloads nothing), turns on compare mode,
moves preference A towards the first objective and B towards the second with the keyboard, generates, and
saves the page once both completions and their scores are in. The PNG is palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _press(page, selector: str, key: str, times: int) -> None:
    page.focus(selector)
    for _ in range(times):
        page.keyboard.press(key)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--out", default="docs/img/playground.png")
    p.add_argument("--prompt", default="Tips for sleeping better?")
    p.add_argument("--max-tokens", type=int, default=40)
    args = p.parse_args()
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("error: no chromium on PATH (apt-get install chromium)")

    import ray
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright
    from ray import serve

    from mage_ray.serve.app import build_app

    port = _free_port()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"bundle": args.bundle, "config": args.config}), name="mage", route_prefix="/")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(300_000)
            expect.set_options(timeout=300_000)  # decoding on CPU takes a while
            page.goto(f"http://127.0.0.1:{port}/playground")
            expect(page.locator("#generate")).to_be_enabled()
            page.check("#compare")
            _press(page, "#mu-a-0", "ArrowRight", 27)  # A: (0.33, 0.33, 0.33) -> (0.60, 0.20, 0.20) for n = 3
            _press(page, "#mu-b-1", "ArrowRight", 60)  # B: (0.8, 0.1, 0.1) -> (0.27, 0.70, 0.03)
            page.fill("#prompt", args.prompt)
            page.fill("#max-tokens", str(args.max_tokens))
            t0 = time.monotonic()
            page.click("#generate")
            for which in "ab":
                expect(page.locator(f"#out-{which}")).to_have_attribute("data-state", "done")
            print(f"generated in {time.monotonic() - t0:.1f} s")
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        serve.shutdown()
        ray.shutdown()
    Image.open(out).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(
        out, optimize=True
    )
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()

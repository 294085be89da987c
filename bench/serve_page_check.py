"""Drive the page of `rnngen serve` in headless Chromium: fill the form, generate, check that the
lyrics stream in, then pick a verse form (七言绝句) with a keyword and check the poem streams in
clause by clause, and save a screenshot.

    apt-get install -y chromium fonts-noto-cjk     # Debian's browser, and fonts for the Chinese text
    pip install playwright                         # the Python driver only: no browser download
    python bench/serve_page_check.py [SCREENSHOT.png] [--url http://127.0.0.1:8000] [--model songci]

Without --url it starts `rnngen serve` on a free loopback port and stops it afterwards. Exits 0
when the page worked (the text grew while streaming, then the form came back with the full text;
the poem has the form's four clauses of seven characters and the keyword), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile

from bench_serve import start_server  # this folder is on the path when the script runs

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def check(url: str, screenshot: str, browser_path: str) -> list[str]:
    """Fill the form, generate, watch the text stream; returns the problems found (none: it works)."""
    from playwright.sync_api import sync_playwright

    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        # bypass_csp: the page forbids eval, which wait_for_function uses to poll
        page = browser.new_page(viewport={"width": 420, "height": 860}, device_scale_factor=2, locale="zh-CN",
                                bypass_csp=True)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("requestfailed", lambda req: errors.append(f"{req.url}: {req.failure}")
                if "v1/completions" not in req.url else None)
        page.goto(url + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 0", timeout=15000)

        # a 4-line acrostic in 7-character lines, rhyming AABB, a little warmer than the default
        page.check("input[name=mode][value=lines]")
        page.fill("#line-length", "7")
        page.fill("#acrostic", "春夏秋冬")
        page.select_option("#rhyme", "AABB")
        page.fill("#temperature", "0.9")
        page.fill("#random-seed", "7")
        page.click("#go")
        page.wait_for_function("document.querySelector('#out').textContent.length > 0", timeout=15000)
        first = len(page.inner_text("#out"))
        page.wait_for_function("!document.querySelector('#go').disabled", timeout=60000)
        text = page.inner_text("#out")
        lines = text.strip().split("\n")
        if len(lines) != 4 or [line[:1] for line in lines] != list("春夏秋冬"):
            problems.append(f"expected 4 lines starting 春夏秋冬, got {text!r}")
        if first >= len(text):
            problems.append("the text did not grow while it streamed")
        if page.is_visible("#error"):
            problems.append("the page shows an error: " + page.inner_text("#error"))

        # then 300 characters from a seed, in English; stop it midway
        page.click("#lang")
        page.check("input[name=mode][value=length]")
        page.fill("#seed", "春风")
        page.fill("#length", "4000")
        page.fill("#random-seed", "")
        page.click("#go")
        page.wait_for_function("document.querySelector('#out').textContent.length > 20", timeout=15000)
        page.click("#stop")
        page.wait_for_function("!document.querySelector('#go').disabled", timeout=15000)
        if "Stopped" not in page.inner_text("#status"):
            problems.append("Stop did not stop: " + page.inner_text("#status"))
        if page.inner_text("#go") != "Generate":
            problems.append("the English labels did not apply")

        # the acrostic song again, for the screenshot, in Chinese
        page.click("#lang")
        page.check("input[name=mode][value=lines]")
        page.fill("#seed", "")
        page.fill("#random-seed", "7")
        page.click("#go")
        page.wait_for_function("!document.querySelector('#go').disabled", timeout=60000)
        if page.inner_text("#out") != text:
            problems.append("the same random seed gave another song")

        # a 七言绝句 with the keyword 春风, for the screenshot: the options a form sets are hidden
        page.wait_for_function("document.querySelector('#verse-form').options.length > 1", timeout=15000)
        page.select_option("#verse-form", "七言绝句")
        if not page.is_visible("#pattern") or "七言绝句" not in page.inner_text("#pattern"):
            problems.append("choosing a form did not show its pattern")
        hidden = [f"#{i}" for i in ("seed", "line-length", "lines", "rhyme", "length") if page.is_visible(f"#{i}")]
        if hidden:
            problems.append(f"a form left {', '.join(hidden)} visible")
        page.fill("#acrostic", "")
        page.fill("#keywords", "春风")
        page.fill("#random-seed", "7")
        page.click("#go")
        page.wait_for_function("document.querySelector('#out').textContent.length > 0", timeout=15000)
        first = len(page.inner_text("#out"))
        page.wait_for_function("!document.querySelector('#go').disabled", timeout=60000)
        poem = page.inner_text("#out")
        lines = poem.strip().split("\n")
        if len(lines) != 4 or not all(re.fullmatch(r"[\u4e00-\u9fff]{7}[，。？！]", line) for line in lines) \
                or "春风" not in poem:
            problems.append(f"expected a 七言绝句 with 春风 (4 clauses of 7 characters), got {poem!r}")
        if first >= len(poem):
            problems.append("the poem did not stream in clause by clause")
        if page.is_visible("#error"):
            problems.append("the page shows an error: " + page.inner_text("#error"))
        page.screenshot(path=screenshot, full_page=True)
        problems += [f"page error: {e}" for e in errors]
        browser.close()
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("screenshot", nargs="?", default=os.path.join(tempfile.gettempdir(), "rnngen-page.png"))
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--model", default="songci")
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser")
                        or "/usr/bin/chromium")
    args = parser.parse_args()
    try:
        import playwright  # noqa: F401
    except ImportError:
        raise SystemExit("needs the playwright driver: pip install playwright (the browser is Debian's chromium: "
                         "apt-get install -y chromium fonts-noto-cjk)")
    if not os.path.exists(args.browser):
        raise SystemExit(f"no Chromium at {args.browser}: apt-get install -y chromium fonts-noto-cjk")
    proc = log = None
    url = args.url
    if url is None:
        proc, url, log = start_server(args.model, 1, [])
    try:
        problems = check(url, args.screenshot, args.browser)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
            os.unlink(log)
    for problem in problems:
        print("FAIL:", problem, file=sys.stderr)
    print(f"{'FAIL' if problems else 'ok'}: screenshot {args.screenshot}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

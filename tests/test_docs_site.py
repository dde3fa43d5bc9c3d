"""The built docs site: `mkdocs build --strict` passes (and fails on a page that drifted from the code), and the
result renders in headless Chromium with working internal links and search.

Chromium is Debian's `chromium` package (`.ci/run` installs it), driven through the DevTools protocol over a
pipe; the site is served from a thread on 127.0.0.1. A screenshot of the Megatron-FSDP guide and one of a
search are kept in build/test-artifacts/.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import html
import http.server
import json
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from vlm_fsdp.launch.slurm import REQUEUE_WARNING_S

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "build" / "test-artifacts"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = mkdocs_build(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, result.stderr
    return site


def test_strict_build_writes_every_page_the_search_index_and_the_reference(site):
    for page in ("guide/megatron-fsdp", "walkthroughs/slurm", "reference/config", "reference/recipes", "reference/cli"):
        assert (site / page / "index.html").is_file(), page
    index = json.loads((site / "search" / "search_index.json").read_text())
    assert any("ddp.nccl_ub" in doc["text"] for doc in index["docs"])
    slurm = html.unescape(re.sub(r"<[^>]+>", "", (site / "walkthroughs" / "slurm" / "index.html").read_text()))
    assert f"#SBATCH --signal=B:USR1@{REQUEUE_WARNING_S}" in slurm, "the embedded `vlm-fsdp slurm` output is missing"


def test_strict_build_fails_on_a_page_that_drifted_from_the_code(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    page = docs / "guide" / "pitfalls.md"
    page.write_text(page.read_text() + "\nSet `ddp.double_buffer=true` and run `vlm-fsdp trian`.\n")
    config = tmp_path / "mkdocs.yml"
    text = (ROOT / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {docs}")
    config.write_text(text.replace("- packages/", f"- {ROOT}/packages/"))
    result = mkdocs_build(config, tmp_path / "site")
    assert result.returncode == 1
    assert "guide/pitfalls.md: `ddp.double_buffer` is not a config key" in result.stderr
    assert "guide/pitfalls.md: `vlm-fsdp trian`: no such vlm-fsdp command" in result.stderr


class Chromium:
    """Headless Chromium driven through the DevTools protocol on a pipe (--remote-debugging-pipe: commands on
    file descriptor 3, replies and events on 4, each a JSON message ended by a NUL byte)."""

    def __init__(self, exe: str, profile: Path):
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        # Move the browser's ends above 4, so that placing them on 3 and 4 cannot overwrite one with the other.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
        os.close(to_browser)
        os.close(from_browser)
        command = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.process = subprocess.Popen(
            ["bash", "-c", f"exec {shlex.join(command)} 3<&{high[0]} 4>&{high[1]}"],
            pass_fds=high,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in high:
            os.close(fd)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        os.close(self._to_browser)
        os.close(self._from_browser)
        self.process.terminate()
        self.process.wait(timeout=30)

    def _receive(self, timeout: float) -> dict | None:
        """The next message, or None when none arrives within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_browser], [], [], remaining)[0]:
                return None
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited with status {self.process.wait()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params} | ({"sessionId": session} if session else {})
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive(60)
            if reply is None:
                raise TimeoutError(f"no reply to {method}")
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            event = self._receive(deadline - time.monotonic())
            if event is None:
                raise TimeoutError(f"no {method} event")
            self.events.append(event)

    def drain(self, settle: float = 0.2) -> list[dict]:
        """Every event received so far, waiting until none arrives for `settle` seconds."""
        while (event := self._receive(settle)) is not None:
            self.events.append(event)
        events, self.events = self.events, []
        return events


class Tab:
    def __init__(self, browser: Chromium):
        self.browser = browser
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            browser.send(f"{domain}.enable", self.session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            self.session,
            width=1280,
            height=1000,
            deviceScaleFactor=1,
            mobile=False,
        )

    def evaluate(self, expression: str):
        result = self.browser.send("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def open(self, url: str) -> list[str]:
        """Load a page; the errors it produced: script exceptions, console errors, failed or refused requests."""
        self.browser.drain(0)
        self.browser.send("Page.navigate", self.session, url=url)
        self.browser.wait_for("Page.loadEventFired")
        errors = []
        for event in self.browser.drain():
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(f"script error: {params['exceptionDetails'].get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(f"console error: {params.get('args')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(f"log error: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Network.loadingFailed":
                errors.append(f"request failed: {params.get('errorText')}")
            elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
                errors.append(f"HTTP {params['response']['status']}: {params['response']['url']}")
        return errors

    def screenshot(self, path: Path) -> None:
        data = self.browser.send("Page.captureScreenshot", self.session, format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))


PAGE_FACTS = """JSON.stringify({
  h1: document.querySelector("article h1")?.textContent ?? null,
  height: document.querySelector("article")?.getBoundingClientRect().height ?? 0,
  navigation: document.querySelectorAll("nav.md-nav--primary a.md-nav__link").length,
  search: document.querySelector("input.md-search__input") !== null,
  links: [...document.querySelectorAll("a[href]")].map(a => a.href),
  ids: [...document.querySelectorAll("[id]")].map(e => e.id),
})"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def server(site):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("Debian's chromium is not installed here (`apt-get install chromium`; .ci/run installs it as root)")
    browser = Chromium(exe, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield Tab(browser)
    finally:
        browser.close()


def page_urls(site: Path, base: str) -> list[str]:
    folders = (p.parent.relative_to(site).as_posix() for p in site.rglob("index.html"))
    return sorted(base if folder == "." else f"{base}{folder}/" for folder in folders)


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_every_page_renders_and_every_internal_link_resolves(site, server, tab):
    pages, errors = {}, {}
    for url in page_urls(site, server):
        errors[url] = tab.open(url)
        pages[url] = json.loads(tab.evaluate(PAGE_FACTS))
    assert len(pages) >= 12
    assert {url: e for url, e in errors.items() if e} == {}
    for url, facts in pages.items():
        assert facts["h1"], f"{url} has no title"
        assert facts["height"] > 200, f"{url} renders an empty article"
        assert facts["navigation"] >= 10 and facts["search"], f"{url} lacks the navigation or the search box"

    broken, checked = [], set()
    for url, facts in pages.items():
        for link in facts["links"]:
            if not link.startswith(server) or link in checked:
                continue
            checked.add(link)
            target, _, anchor = link.partition("#")
            if target.endswith("/") and target not in pages:
                broken.append(f"{url} -> {link}: no such page")
            elif target in pages and anchor and anchor not in pages[target]["ids"]:
                broken.append(f"{url} -> {link}: no such anchor")
            elif target not in pages and status(target) != 200:
                broken.append(f"{url} -> {link}: HTTP {status(target)}")
    assert len(checked) > 50
    assert broken == []


def search(tab, page: str, text: str) -> bool:
    """Type into the search box until results show. The theme reads the query on keyup (and just after focus), and
    inserted text makes no key event, so a keyup follows the insertion. On a loaded machine the search worker can
    miss its start; a fresh load of the page starts it again."""
    for _ in range(3):
        deadline, retype = time.monotonic() + 30, 0.0
        while time.monotonic() < deadline:
            if tab.evaluate("document.querySelectorAll('.md-search-result__item').length"):
                return True
            if time.monotonic() >= retype:
                tab.evaluate(
                    "(() => { const i = document.querySelector('input.md-search__input'); i.value = ''; i.focus(); })()"
                )
                tab.browser.send("Input.insertText", tab.session, text=text)
                tab.evaluate(
                    "document.querySelector('input.md-search__input')"
                    ".dispatchEvent(new KeyboardEvent('keyup', {bubbles: true}))"
                )
                retype = time.monotonic() + 5
            time.sleep(0.2)
        assert tab.open(page) == []
    return False


def test_guide_screenshot_and_search(server, tab):
    guide = server + "guide/megatron-fsdp/"
    assert tab.open(guide) == []
    shot = ARTIFACTS / "docs-megatron-fsdp-guide.png"
    tab.screenshot(shot)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000

    assert search(tab, guide, "requeue"), "the search found nothing for 'requeue'"
    titles = tab.evaluate("[...document.querySelectorAll('.md-search-result__item h1')].map(h => h.textContent)")
    assert "Slurm jobs" in titles, titles
    time.sleep(0.5)  # let the result panel finish fading in
    tab.screenshot(ARTIFACTS / "docs-search.png")

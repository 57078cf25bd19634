"""The built docs site in a real browser with the network off: every diagram draws, offline.

Material for MkDocs fetches Mermaid from a CDN unless the page already has
it; the site serves its own copy (`make docs-assets`, pinned in
docs/javascripts/package-lock.json). Chromium resolves no host but
127.0.0.1 here, so anything the site tried to load from the internet fails,
and its diagrams would stay source text.
"""

import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
import time

from .conftest import REPO_ROOT, subprocess_env, unavailable

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MERMAID = REPO_ROOT / "docs" / "javascripts" / "mermaid.min.js"


def diagrams_drawn(driver) -> int:
    """SVGs inside the (closed) shadow roots that Material renders each diagram into.

    Chromium's DevTools protocol sees through closed shadow roots; the page's
    own scripts cannot.
    """
    document = driver.execute_cdp_cmd("DOM.getDocument", {"depth": -1, "pierce": True})
    drawn, todo = 0, [document["root"]]
    while todo:
        node = todo.pop()
        attributes = node.get("attributes", [])
        classes = dict(zip(attributes[::2], attributes[1::2], strict=True)).get("class", "")
        if "mermaid" in classes.split():
            for root in node.get("shadowRoots", []):
                drawn += any(child.get("nodeName") == "svg" for child in root.get("children", []))
        todo.extend(node.get("children", []))
        todo.extend(node.get("shadowRoots", []))
    return drawn


def test_every_diagram_draws_with_the_network_off(tmp_path):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        unavailable(f"{', '.join(missing)} missing (apt-get install chromium chromium-driver)")
    if not MERMAID.exists():
        unavailable(f"{MERMAID} missing: make docs-assets")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    site = tmp_path / "site"
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)]
    subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(NO_MKDOCS_2_WARNING="1"), check=True)
    expected = {
        page: len(
            re.findall(r"^```mermaid$", (REPO_ROOT / "docs" / f"{page}.md").read_text(), re.M)
        )
        for page in ("architecture", "closing-the-loop")
    }
    assert expected == {"architecture": 3, "closing-the-loop": 1}
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        # The network off: no host resolves but this machine's own.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        for page, count in expected.items():
            driver.get(f"http://127.0.0.1:{server.server_address[1]}/{page}/")
            deadline = time.monotonic() + 60
            while diagrams_drawn(driver) < count and time.monotonic() < deadline:
                time.sleep(0.5)
            assert diagrams_drawn(driver) == count, page
            loaded = driver.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.name)"
            )
            assert [url for url in loaded if not url.startswith("http://127.0.0.1:")] == []
    finally:
        driver.quit()
        server.shutdown()

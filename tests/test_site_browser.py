"""The course site in a real browser: headless Chromium opens the index and three lectures of a quick site; the test
checks that their figures render (decoded by the browser, not blank), that every internal link resolves, and that no
page logs a console error or fails a request (the site must work offline).

Skipped, with the reason, where Chromium or Playwright is absent. To run it:
    apt-get install chromium        # Debian's package; any Chromium or Chrome on PATH will do
    pip install playwright          # the Python driver only: it drives the system Chromium, nothing is downloaded
"""
import functools, http.server, shutil, threading, urllib.request
import pytest

CHROMIUM = next((p for p in map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome')) if p), None)
LECTURES = ['02_metrics', '03_media', '19_quality']   # quick lectures with figures

if CHROMIUM is None: pytest.skip('no Chromium on PATH (apt-get install chromium) for the browser test', allow_module_level=True)
sync_api = pytest.importorskip('playwright.sync_api', reason='no Playwright (pip install playwright) to drive Chromium')
pytestmark = pytest.mark.timeout(900)

PIXELS = """() => [...document.querySelectorAll('.jp-RenderedImage img')].map(i => {
    const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
    if (!c.width || !c.height) return {w: 0, std: 0};
    const g = c.getContext('2d'); g.drawImage(i, 0, 0);
    const d = g.getImageData(0, 0, c.width, c.height).data; let s = 0, s2 = 0; const n = d.length / 4;
    for (let k = 0; k < d.length; k += 4) { const v = (d[k] + d[k + 1] + d[k + 2]) / 3; s += v; s2 += v * v; }
    return {w: i.naturalWidth, std: Math.sqrt(Math.max(s2 / n - (s / n) ** 2, 0))};
})"""


@pytest.fixture(scope='module')
def served_site(tmp_path_factory):
    from deepfake_course.site import build_site
    out = tmp_path_factory.mktemp('course-site')
    res = build_site(out, quick=True, only=LECTURES, verbose=False)
    assert not res['failed'], res['failed']
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(out / 'site')))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{srv.server_address[1]}/'
    srv.shutdown()


def test_site_in_chromium(served_site):
    base, problems, checked = served_site, [], set()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
        page = browser.new_page()
        page.on('console', lambda m: problems.append(f'console {m.type}: {m.text}') if m.type == 'error' else None)
        page.on('pageerror', lambda e: problems.append(f'page error: {e}'))
        page.on('requestfailed', lambda r: problems.append(f'request failed: {r.url} ({r.failure})'))
        for url in ['index.html'] + [f'lectures/{n}.html' for n in LECTURES]:
            page.goto(base + url, wait_until='load')
            assert page.title(), f'{url}: no title'
            if url.startswith('lectures/'):
                figs = page.evaluate(PIXELS)
                assert figs, f"{url}: no figure ({page.evaluate('() => [document.images.length, document.title, location.href]')})"
                assert all(f['w'] > 0 and f['std'] > 1 for f in figs), f'{url}: a figure did not render or is blank: {figs}'
            for href in page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href.split('#')[0])"):
                if not href.startswith(base) or href in checked: continue
                checked.add(href)
                with urllib.request.urlopen(href) as r: assert r.status == 200, href
        browser.close()
    assert not problems, '\n'.join(problems)
    assert len(checked) > len(LECTURES)

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
    import pandas as pd
    out = tmp_path_factory.mktemp('course-site')
    runs = tmp_path_factory.mktemp('run-60c')   # a leaderboard from a given run folder (60c itself is too slow for this test)
    pd.DataFrame([dict(detector=d, source=s, perturbation=p, auroc=a, low=a - 0.04, high=a + 0.04, n_real=32, n_fake=32)
                  for d, a0 in (('meso4', 0.62), ('xray', 0.81), ('f3net', 0.74)) for s, ds in (('blend-swap', 0.1), ('dcgan', 0.0))
                  for p, dp in (('clean', 0.0), ('blur1', -0.05)) for a in [a0 + ds + dp]]).to_csv(runs / 'generalisation.csv', index=False)
    res = build_site(out, quick=True, only=LECTURES, verbose=False, leaderboard=runs)
    assert not res['failed'], res['failed']
    assert res['leaderboard'] == str(runs)
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
        for url in ['index.html', 'leaderboard.html'] + [f'lectures/{n}.html' for n in LECTURES]:
            page.goto(base + url, wait_until='load')
            assert page.title(), f'{url}: no title'
            if url.startswith('lectures/'):
                figs = page.evaluate(PIXELS)
                assert figs, f"{url}: no figure ({page.evaluate('() => [document.images.length, document.title, location.href]')})"
                assert all(f['w'] > 0 and f['std'] > 1 for f in figs), f'{url}: a figure did not render or is blank: {figs}'
            if url == 'leaderboard.html':   # the table sorts: AUROC (column 7) descending after two clicks
                head = page.locator('table[data-sortable] thead th').nth(6)
                head.click(); head.click()
                col = [float(v) for v in page.evaluate("() => [...document.querySelectorAll('table[data-sortable] tbody tr')].map(r => r.cells[6].getAttribute('data-v'))")]
                assert len(col) == 12 and col == sorted(col, reverse=True), col
            for href in page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href.split('#')[0])"):
                if not href.startswith(base) or href in checked: continue
                checked.add(href)
                with urllib.request.urlopen(href) as r: assert r.status == 200, href
        browser.close()
    assert not problems, '\n'.join(problems)
    assert len(checked) > len(LECTURES)

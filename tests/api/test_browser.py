"""The worklist in real headless Chromium: sign in, filter, open a study, see the image and
the heatmap, give feedback; axe-core finds no serious accessibility violation on any page.

Screenshots are saved under the test's temporary directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db import access
from db.engine import session_scope
from tests.api.conftest import StaffDb

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
]  # fmt: skip


@pytest.fixture
def browser(live_server: str) -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class AxeScanner:
    """axe-core in a second page that shares the session cookie.

    axe is injected by ``evaluate()``, which the app's Content-Security-Policy
    refuses, so only this page bypasses the CSP; the flow under test runs with it.
    """

    def __init__(self, browser: Any, strict_context: Any) -> None:
        self._context = browser.new_context(
            viewport={"width": 1400, "height": 1000}, bypass_csp=True
        )
        self._strict = strict_context
        self._page = self._context.new_page()

    def serious_violations(self, url: str) -> list[str]:
        from axe_playwright_python.sync_playwright import Axe

        self._context.clear_cookies()
        self._context.add_cookies(self._strict.cookies())
        self._page.goto(url)
        self._page.wait_for_load_state("networkidle")
        results = Axe().run(self._page)
        return [
            f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']][:3]}"
            for v in results.response["violations"]
            if v["impact"] in ("serious", "critical")
        ]

    def close(self) -> None:
        self._context.close()


def _loaded(page: Any, selector: str) -> bool:
    return bool(page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0"))


def test_worklist_in_chromium(
    browser: Any, live_server: str, staff_db: StaffDb, tmp_path: Path
) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    axe = AxeScanner(browser, context)
    try:
        _walk_through(context, axe, live_server, staff_db, tmp_path)
    finally:
        axe.close()
        context.close()


def _walk_through(
    context: Any, axe: AxeScanner, live_server: str, staff_db: StaffDb, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    first = staff_db.studies[0]
    page = context.new_page()
    page.set_default_timeout(15_000)
    csp_errors: list[str] = []
    page.on(
        "console",
        lambda m: csp_errors.append(m.text) if "Content Security Policy" in m.text else None,
    )

    page.goto(live_server + "/")
    assert page.url.endswith("/signin")
    assert axe.serious_violations(page.url) == []
    page.get_by_label("API token").fill(staff_db.tokens["radiologist"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(live_server + "/")
    page.screenshot(path=str(shots / "1-worklist.png"), full_page=True)
    rows = page.locator("table.worklist tbody tr")
    assert rows.count() == 6
    # triage order: pneumonia-likely first
    assert rows.nth(0).locator("td").nth(4).inner_text() == "pneumonia likely"
    bar = page.get_by_role("img", name="probability 0.83, threshold 0.40")
    assert bar.locator("rect.prob-fill").get_attribute("width") == "99.6"
    assert axe.serious_violations(page.url) == []

    page.get_by_label("Patient ID").fill("P001")
    page.get_by_label("Finding").select_option("pneumonia")
    page.get_by_role("button", name="Apply filters").click()
    page.wait_for_url("**patient_id=P001**")
    assert rows.count() == 2
    assert page.get_by_label("Patient ID").input_value() == "P001"  # the filter is kept
    page.screenshot(path=str(shots / "2-filtered.png"), full_page=True)

    page.get_by_role("row").filter(has_text="ACC001").get_by_role("link").click()
    page.wait_for_url(f"**/studies/{first.study_uid}")
    image = page.get_by_role("img", name="Chest radiograph, image 1")
    heatmap = page.get_by_role("img", name="Heatmap of the regions that drove the model, image 1")
    image.wait_for()
    heatmap.wait_for()
    page.wait_for_load_state("networkidle")
    assert _loaded(page, "img[alt^='Chest radiograph']") and _loaded(page, "img[alt^='Heatmap']")
    assert "pneumonet-1.0.0" in page.inner_text("main")
    page.screenshot(path=str(shots / "3-study.png"), full_page=True)
    assert axe.serious_violations(page.url) == []

    page.get_by_label("disagree").check()
    page.get_by_label("other-finding").check()
    page.get_by_role("button", name="Save feedback").click()
    page.get_by_role("status").filter(has_text="Feedback saved").wait_for()
    assert "radiologist-user: disagree, final label other-finding" in page.inner_text("#feedback")
    page.screenshot(path=str(shots / "4-feedback.png"), full_page=True)
    with session_scope(staff_db.url) as s:
        rows_saved = access.feedback_rows(s, study_uids=[first.study_uid])
    assert [(r.agreement.value, r.final_label and r.final_label.value) for r in rows_saved] == [
        ("disagree", "other-finding")
    ]
    assert sorted(p.name for p in shots.iterdir()) == [
        "1-worklist.png", "2-filtered.png", "3-study.png", "4-feedback.png",
    ]  # fmt: skip

    page.goto(live_server + "/")
    page.keyboard.press("Tab")  # keyboard users: the skip link first, then the filters
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")  # focus moves to the main content
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "f-patient"
    assert csp_errors == []

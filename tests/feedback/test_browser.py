"""A real browser: headless Debian Chromium, driven by Playwright, rates by clicking and by keyboard.

Screenshots of every page go to $FEEDBACK_SCREENSHOTS (default: the test's tmp folder); each is
checked not to be blank.
"""
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("django", reason="the feedback app needs: pip install 'palm-rlhf[feedback]'")
pytest.importorskip("pytest_django", reason="the feedback tests need pytest-django")
pytest.importorskip("playwright", reason="browser tests need: pip install playwright pytest-playwright")
pytest.importorskip("pytest_playwright", reason="browser tests need: pip install pytest-playwright")
if not shutil.which("chromium") and not Path("/usr/bin/chromium").exists():
    pytest.skip("browser tests need Debian's chromium: apt-get install chromium", allow_module_level=True)

from django.utils import timezone  # noqa: E402
from PIL import Image  # noqa: E402
from playwright.sync_api import expect  # noqa: E402

from palm_rlhf.feedback.models import Answer, Item  # noqa: E402
from palm_rlhf.feedback.tasks import add_responses  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def shot(page, tmp_path):
    folder = Path(os.environ.get("FEEDBACK_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)

    def take(name):
        png = page.screenshot(path=folder / f"{name}.png", full_page=True)
        low, high = Image.open(io.BytesIO(png)).convert("L").getextrema()
        assert high - low > 100, f"screenshot {name} looks blank"

    return take


def make_items():
    add_responses("Write a haiku about the sea.",
                  ["Waves fold into foam\nsalt wind carries gull voices\nthe tide keeps its time",
                   "The sea is big and wet.", "blue blue blue blue"], source="test", overlap=2)
    add_responses("Explain why the sky is blue in one sentence.",
                  ["Sunlight scatters off air molecules, blue light the most: its wavelength is short.",
                   "Because the ocean reflects it."], source="test", overlap=2)


def log_in(page, url, username):
    page.goto(url + "/")
    page.wait_for_url(re.compile(r"/login/"))
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", f"{username}-password")
    page.click("button.primary")
    page.wait_for_url(url + "/")


def current_item(page) -> str:
    return page.locator("#card form").get_attribute("action")


def answer(page, act):
    """Do `act` (a click or a key press) and wait for htmx to swap in the next card."""
    before = current_item(page)
    act()
    expect(page.locator("#card")).not_to_contain_text(f"Item #{before.split('/')[2]} ")


def test_rate_and_compare_in_browser(page, live_server, rater, shot):
    make_items()
    rater("ann"), rater("boss", staff=True)
    bob = rater("bob")
    page.goto(live_server.url + "/")
    shot("1_login")
    log_in(page, live_server.url, "ann")
    shot("2_home")

    page.goto(live_server.url + "/rate/")
    page.wait_for_load_state("load")  # htmx is deferred: wait for it before clicking
    page.evaluate("window.notReloaded = true")
    shot("3_rate")
    answer(page, lambda: page.click("#card button[value='4']"))
    page.click("h2")  # keys must not land in an input
    answer(page, lambda: page.keyboard.press("2"))
    for key in "513":
        answer(page, lambda: page.keyboard.press(key))
    expect(page.locator("#card")).to_contain_text("All done")
    shot("4_rate_done")
    assert page.evaluate("window.notReloaded") is True  # every answer was an htmx swap

    page.goto(live_server.url + "/compare/")
    page.wait_for_load_state("load")
    shot("5_compare")
    answer(page, lambda: page.click("#card button[value='b']"))
    page.click("h2")
    answer(page, lambda: page.keyboard.press("a"))
    answer(page, lambda: page.keyboard.press("t"))
    answer(page, lambda: page.keyboard.press("s"))

    mine = Answer.objects.filter(rater__username="ann", answered_at__isnull=False)
    assert sorted(mine.filter(item__kind=Item.RATE).values_list("rating", flat=True)) == [1, 2, 3, 4, 5]
    assert sorted(mine.filter(item__kind=Item.COMPARE).values_list("choice", flat=True)) == ["a", "b", "skip", "tie"]

    # a second rater, written straight to the database, so the stats page has agreement to show
    for item in Item.objects.all():
        value = {"rating": 4} if item.kind == Item.RATE else {"choice": "a"}
        Answer.objects.create(item=item, rater=bob, answered_at=timezone.now(), **value)

    page.click("text=Log out")
    log_in(page, live_server.url, "boss")
    exported = page.request.get(live_server.url + "/export/ratings.jsonl").text()
    ratings = [json.loads(line) for line in exported.splitlines()]
    assert sorted(r["rating"] for r in ratings) == sorted([4, 2, 5, 1, 3] + [4] * 5)  # ann's and bob's
    pairs = [json.loads(line) for line in page.request.get(live_server.url + "/export/pairs.jsonl").text().splitlines()]
    assert len(pairs) == 2 + 4 and all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)

    for name, path in [("6_stats", "/stats/"), ("7_tasks", "/tasks/"), ("8_invites", "/invites/")]:
        page.goto(live_server.url + path)
        if name == "8_invites":
            page.click("text=New invite link")
        shot(name)
    invite = page.locator("td code").first.text_content()
    page.click("text=Log out")
    page.goto(invite)
    shot("9_invite")


def test_a_retried_answer_moves_on_in_browser(page, live_server, rater):
    """An answer gets in but its response never reaches the page; clicking again moves on to the next card."""
    add_responses("Name a colour.", ["red", "green"], source="test")  # two rating items
    rater("ann")
    log_in(page, live_server.url, "ann")
    page.goto(live_server.url + "/rate/")
    page.wait_for_load_state("load")
    first = current_item(page)
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    sent = page.request.post(live_server.url + first, form={"rating": "2"},
                             headers={"X-CSRFToken": token, "HX-Request": "true"})
    assert sent.status == 200  # answered, behind the page's back: the page still shows that card
    answer(page, lambda: page.click("#card button[value='5']"))  # 409, carrying the next card
    expect(page.locator("#card .notice")).to_contain_text(f"already answered item #{first.split('/')[2]}")
    expect(page.locator("#flash")).to_be_hidden()
    page.click("h2")
    answer(page, lambda: page.keyboard.press("4"))
    expect(page.locator("#card")).to_contain_text("All done")
    assert sorted(Answer.objects.filter(answered_at__isnull=False).values_list("rating", flat=True)) == [2, 4]

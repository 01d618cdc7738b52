"""The web app through Django's test client: auth, CSRF, bad input, hand-out rules, staff pages."""
import re

import pytest

pytest.importorskip("django", reason="the feedback app needs: pip install 'palm-rlhf[feedback]'")
pytest.importorskip("pytest_django", reason="the feedback tests need pytest-django")

from django.test import override_settings  # noqa: E402

from palm_rlhf.feedback.models import Answer, Invite, Item  # noqa: E402
from palm_rlhf.feedback.stats import pairwise_agreement  # noqa: E402

pytestmark = pytest.mark.django_db


def shown_item(client, page="/rate/") -> int:
    """The id of the item a page hands out (from its form's action)."""
    html = client.get(page).content.decode()
    return int(re.search(r'action="/answer/(\d+)/"', html).group(1))


def item_in(html: str) -> int | None:
    match = re.search(r'action="/answer/(\d+)/"', html)
    return int(match.group(1)) if match else None


def answered():
    return list(Answer.objects.filter(answered_at__isnull=False).values_list("item_id", "rater__username", "rating", "choice"))


@pytest.mark.parametrize("method,url", [
    ("get", "/"), ("get", "/rate/"), ("get", "/compare/"), ("get", "/stats/"),
    ("get", "/export/ratings.jsonl"), ("get", "/tasks/"), ("post", "/answer/1/"),
])
def test_login_required(client, make_items, method, url):
    make_items()
    response = getattr(client, method)(url, {"rating": "3"} if method == "post" else None)
    assert response.status_code == 302 and response.url.startswith("/login/")
    assert not Answer.objects.exists()


def test_login_page_then_rate(client, rater, make_items):
    make_items()
    rater("ann")
    response = client.post("/login/", {"username": "ann", "password": "ann-password"})
    assert response.status_code == 302 and response.url == "/"
    item_id = shown_item(client)
    assert client.post(f"/answer/{item_id}/", {"rating": "4"}).status_code == 302
    assert answered() == [(item_id, "ann", 4, "")]


@pytest.mark.parametrize("url", ["/stats/", "/export/ratings.jsonl", "/export/pairs.jsonl", "/tasks/", "/invites/"])
def test_staff_pages_refuse_raters(client_for, url):
    assert client_for("ann").get(url).status_code == 403
    assert client_for("boss", staff=True).get(url).status_code == 200


def test_csrf_enforced(client_for, make_items):
    make_items()
    client = client_for("ann", enforce_csrf_checks=True)
    item_id = shown_item(client)
    assert client.post(f"/answer/{item_id}/", {"rating": "3"}).status_code == 403
    assert answered() == []
    token = client.cookies["csrftoken"].value
    assert client.post(f"/answer/{item_id}/", {"rating": "3"}, HTTP_X_CSRFTOKEN=token).status_code == 302
    assert answered() == [(item_id, "ann", 3, "")]


@pytest.mark.parametrize("value", ["0", "6", "-1", "2.5", "x", "", None, "05", "\u0663", "9" * 5000])
def test_rating_out_of_range_is_400(client_for, make_items, value):
    make_items(num_bins=5)
    client = client_for("ann")
    item_id = shown_item(client)
    response = client.post(f"/answer/{item_id}/", {} if value is None else {"rating": value})
    assert response.status_code == 400
    text = response.content.decode()
    assert text.startswith("A rating must be a whole number from 1 to 5, not ") and len(text) < 100  # not Python's
    assert answered() == []


def test_bad_choice_and_wrong_field_are_400(client_for, make_items):
    make_items()
    client = client_for("ann")
    item_id = shown_item(client, "/compare/")
    assert client.post(f"/answer/{item_id}/", {"choice": "c"}).status_code == 400
    assert client.post(f"/answer/{item_id}/", {"rating": "3"}).status_code == 400
    assert answered() == []


@pytest.mark.parametrize("item_id", [2**63 - 1, 2**63, 2**64, 10**30])
def test_ids_beyond_the_database_are_404(client_for, make_items, item_id):
    make_items()
    assert client_for("ann").post(f"/answer/{item_id}/", {"rating": "3"}).status_code == 404


def test_unknown_or_unassigned_item_is_404(client_for, make_items):
    make_items()
    ann, bob = client_for("ann"), client_for("bob")
    assert ann.post("/answer/999999/", {"rating": "3"}).status_code == 404
    bobs_item = shown_item(bob)
    response = ann.post(f"/answer/{bobs_item}/", {"rating": "1"})  # never handed to ann
    assert response.status_code == 404 and "not given to you" in response.content.decode()
    assert answered() == []


def test_duplicate_submit_is_409_and_keeps_first(client_for, make_items):
    make_items()
    client = client_for("ann")
    item_id = shown_item(client)
    assert client.post(f"/answer/{item_id}/", {"rating": "2"}).status_code == 302
    response = client.post(f"/answer/{item_id}/", {"rating": "5"})
    html = response.content.decode()
    assert response.status_code == 409 and "already answered" in html
    assert "<html" in html and item_in(html) not in (None, item_id)  # without htmx: the page, at the next card
    assert answered() == [(item_id, "ann", 2, "")]


def test_retry_after_a_lost_response_moves_on(client_for, make_items):
    """The answer got in but its response was lost; the retry gets 409 and the next card to swap in."""
    make_items()
    client = client_for("ann")
    first = shown_item(client)
    lost = client.post(f"/answer/{first}/", {"rating": "3"}, HTTP_HX_REQUEST="true")
    retry = client.post(f"/answer/{first}/", {"rating": "4"}, HTTP_HX_REQUEST="true")
    html = retry.content.decode()
    assert retry.status_code == 409 and "<html" not in html and html.lstrip().startswith('<section id="card"')
    assert f"You had already answered item #{first}" in html
    assert item_in(html) == item_in(lost.content.decode()) != first  # the card the lost response carried
    assert answered() == [(first, "ann", 3, "")]


def test_htmx_submit_returns_next_card_fragment(client_for, make_items):
    make_items()
    client = client_for("ann")
    first = shown_item(client)
    response = client.post(f"/answer/{first}/", {"rating": "3"}, HTTP_HX_REQUEST="true")
    html = response.content.decode()
    assert response.status_code == 200 and "<html" not in html and 'id="card"' in html
    second = int(re.search(r'action="/answer/(\d+)/"', html).group(1))
    assert second != first


def test_each_rater_sees_each_item_once(client_for, make_items):
    make_items(prompts=1, responses=3, overlap=1)  # 3 rating items
    ann, bob = client_for("ann"), client_for("bob")
    seen = {"ann": [], "bob": []}
    for name, client in (("ann", ann), ("bob", bob), ("ann", ann)):
        item_id = shown_item(client)
        assert shown_item(client) == item_id  # reloading shows the same item, not a new one
        seen[name].append(item_id)
        client.post(f"/answer/{item_id}/", {"rating": "3"})
    assert len(set(seen["ann"] + seen["bob"])) == 3  # overlap 1: nobody got anyone else's item
    assert "All done" in ann.get("/rate/").content.decode()
    assert "All done" in bob.get("/rate/").content.decode()


def test_overlap_gives_an_item_to_several_raters(client_for, make_items):
    make_items(prompts=1, responses=1, overlap=2)  # one rating item, wanted from two raters
    ann, bob, cat = client_for("ann"), client_for("bob"), client_for("cat")
    assert shown_item(ann) == shown_item(bob)
    assert "All done" in cat.get("/rate/").content.decode()


@override_settings(FEEDBACK_LEASE_SECONDS=0)
def test_abandoned_hand_out_expires(client_for, make_items):
    make_items(prompts=1, responses=1, overlap=1)
    ann, bob = client_for("ann"), client_for("bob")
    item_id = shown_item(ann)  # ann walks away without answering
    assert shown_item(bob) == item_id


@override_settings(FEEDBACK_LEASE_SECONDS=0)
@pytest.mark.parametrize("first", ["ann", "bob"])
def test_expired_hand_out_never_pushes_an_item_past_its_overlap(client_for, make_items, first):
    make_items(prompts=1, responses=1, overlap=1)
    clients = {"ann": client_for("ann"), "bob": client_for("bob")}
    item_id = shown_item(clients["ann"])
    assert shown_item(clients["bob"]) == item_id  # ann's hand-out ran out, so bob is given the item too
    second = "bob" if first == "ann" else "ann"
    assert clients[first].post(f"/answer/{item_id}/", {"rating": "2"}, HTTP_HX_REQUEST="true").status_code == 200
    late = clients[second].post(f"/answer/{item_id}/", {"rating": "5"}, HTTP_HX_REQUEST="true")
    html = late.content.decode()
    assert late.status_code == 409 and "answered by someone else" in html and "All done" in html
    assert answered() == [(item_id, first, 2, "")]
    assert Answer.objects.count() == 1  # the late rater's hand-out is gone, so nothing waits for them
    assert "All done" in clients[second].get("/rate/").content.decode()


def test_raters_cannot_see_each_others_answers(client_for, make_items):
    make_items(prompts=1, responses=1, overlap=2)
    ann, bob = client_for("ann"), client_for("bob")
    item_id = shown_item(ann)
    ann.post(f"/answer/{item_id}/", {"rating": "5"})
    bob_home = bob.get("/").content.decode()
    assert re.search(r"<strong>0</strong> done", bob_home)
    assert shown_item(bob) == item_id
    assert bob.post(f"/answer/{item_id}/", {"rating": "1"}).status_code == 302
    assert sorted(answered()) == [(item_id, "ann", 5, ""), (item_id, "bob", 1, "")]


def test_compare_choices(client_for, make_items):
    make_items(prompts=1, responses=2)  # one comparison item
    client = client_for("ann")
    item_id = shown_item(client, "/compare/")
    assert client.post(f"/answer/{item_id}/", {"choice": "tie"}).status_code == 302
    assert answered() == [(item_id, "ann", None, "tie")]


def test_invite_link_makes_one_account(client, client_for, django_user_model):
    boss = client_for("boss", staff=True)
    boss.post("/invites/", {})
    token = Invite.objects.get().token
    assert token in boss.get("/invites/").content.decode()
    form = {"username": "newbie", "password1": "a-long-pass-phrase", "password2": "a-long-pass-phrase"}
    response = client.post(f"/invite/{token}/", form)
    assert response.status_code == 302 and response.url == "/"
    assert client.get("/").status_code == 200  # logged in
    newbie = django_user_model.objects.get(username="newbie")
    assert not newbie.is_staff and Invite.objects.get().used_by == newbie
    assert client.post(f"/invite/{token}/", {**form, "username": "again"}).status_code == 404


@pytest.mark.parametrize("name,error", [("ALICE", "a user named &#x27;alice&#x27; exists already"),
                                        ("<b>x</b>", "a username may hold only letters")])
def test_invite_and_admin_forms_check_usernames_like_adduser(client, client_for, django_user_model, name, error):
    django_user_model.objects.create_user("alice")
    boss = client_for("boss", staff=True)
    boss.post("/invites/", {})
    form = {"username": name, "password1": "a-long-pass-phrase", "password2": "a-long-pass-phrase"}
    page = client.post(f"/invite/{Invite.objects.get().token}/", form)
    assert page.status_code == 200 and error in page.content.decode()
    chief = client_for("chief", staff=True)
    django_user_model.objects.filter(username="chief").update(is_superuser=True)  # may add users in the admin
    page = chief.post("/admin/auth/user/add/", {**form, "usable_password": "true"})
    assert page.status_code == 200 and error in page.content.decode()
    assert set(django_user_model.objects.values_list("username", flat=True)) == {"alice", "boss", "chief"}


def test_stats_page_shows_agreement(client_for, make_items):
    make_items(prompts=1, responses=1, overlap=2)
    for name, rating in (("ann", "4"), ("bob", "5")):
        client = client_for(name)
        client.post(f"/answer/{shown_item(client)}/", {"rating": rating})
    html = client_for("boss", staff=True).get("/stats/").content.decode()
    assert "<strong>0%</strong> of 1 pairs" in html  # exact
    assert "<strong>100%</strong> of 1 pairs" in html  # within one
    assert "ann" in html and "bob" in html


def test_pairwise_agreement():
    assert pairwise_agreement([[1, 1, 2], [3, 3]]) == (2, 4)
    assert pairwise_agreement([[1, 2]], agree=lambda x, y: abs(x - y) <= 1) == (1, 1)
    assert pairwise_agreement([]) == (0, 0)


def test_tasks_page_polls_while_generating(client_for, make_items):
    from palm_rlhf.feedback.models import GenerationJob

    make_items()
    boss = client_for("boss", staff=True)
    assert "every 2s" not in boss.get("/tasks/").content.decode()
    GenerationJob.objects.create(checkpoint="ckpt", prompts_file="p.txt", samples_per_prompt=2, total=4, done=1)
    html = boss.get("/tasks/progress/").content.decode()
    assert "every 2s" in html and "1/4 prompts" in html and "width: 25%" in html
    assert Item.objects.count() == 2 * (3 + 3)

"""Simulated raters through the real app: cards read back exactly, and a live server's answers, log and
export agreeing answer for answer across a run stopped by `limit` and resumed."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("django", reason="the feedback app needs: pip install 'palm-rlhf[feedback]'")
pytest.importorskip("pytest_django", reason="the feedback tests need pytest-django")
pytest.importorskip("waitress", reason="the server is waitress: pip install 'palm-rlhf[feedback]'")

from palm_rlhf.feedback.crowd import (  # noqa: E402
    answer_comparisons, make_accounts, parse_card, read_log, serving)
from palm_rlhf.feedback.export import read_pairs  # noqa: E402
from palm_rlhf.feedback.tasks import add_pair  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# what HTML escaping and a careless parser would change: markup, entities, quotes, newlines at the
# ends, tabs, CRLF, characters beyond ASCII (one of them outside the BMP)
PROMPT = 'Say <b>hi</b> & "bye" to O\'Brien —\n  indented'
TRICKY = ("x < y && y > 'z'\n\tthe end &amp; &lt;literal&gt;", "\nünïcødé 🙂 \"quoted\"\r\nline  ")


@pytest.mark.django_db
def test_a_card_gives_back_its_texts_exactly(client_for, client):
    add_pair(PROMPT, *TRICKY, source="test")
    ann = client_for("ann")
    card = parse_card(ann.get("/compare/").content.decode())
    assert card.prompt == PROMPT and {card.a, card.b} == set(TRICKY) and card.a != card.b
    reply = ann.post(f"/answer/{card.item}/", {"choice": "a"}, headers={"HX-Request": "true"})
    assert reply.status_code == 200 and parse_card(reply.content.decode()) is None  # All done
    with pytest.raises(RuntimeError, match="not a comparison card: 'Log in · palm-rlhf'"):
        parse_card(client.get("/compare/", follow=True).content.decode())  # what a lost session gets


# six pairs: B longer, A longer (as given; the app shows them either way round), two of equal length
# (ties), and one the judge skips; the export leaves ties and skips out
PAIRS = [
    (PROMPT, *TRICKY),
    ("Name a colour.", "red", "turquoise"),
    ("Name a fruit.", "pomegranate", "fig"),
    ("Two letters.", "ab", "cd"),
    ("Three letters.", "abc", "xyz"),
    ("Anything [skip]", "something", "anything at all"),
]
OVERLAP, NAMES = 2, ["ann", "bob", "cy"]


def longer_wins(rater, prompt, a, b):
    if "[skip]" in prompt:
        return "skip"
    return "tie" if len(a) == len(b) else "a" if len(a) > len(b) else "b"


def export_pairs(data: Path, path: Path) -> list[dict]:
    subprocess.run([sys.executable, "-m", "palm_rlhf.feedback", "--data-dir", str(data), "export", "--pairs",
                    str(path)], cwd=REPO, check=True, capture_output=True)
    return read_pairs(path)


def as_pairs(log: list[dict]) -> Counter:
    """The log's answers as the export writes them: chosen and rejected, ties and skips left out."""
    return Counter((r["prompt"], *((r["a"], r["b"]) if r["choice"] == "a" else (r["b"], r["a"])))
                   for r in log if r["choice"] in ("a", "b"))


def test_raters_answer_every_item_through_a_live_server_stopped_and_resumed(tmp_path):
    """Three accounts, six pairs, overlap 2: a judge that breaks off, a run stopped after 5 answers, the rest
    resumed with the same log; the log then holds every item twice, by two raters, as the export does."""
    data, log = tmp_path / "data", tmp_path / "answers.jsonl"
    (tmp_path / "pairs.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "pair": [a, b]}, ensure_ascii=False) + "\n" for p, a, b in PAIRS),
        encoding="utf-8")
    accounts = make_accounts(data, NAMES)  # the real hasher: a few hundred ms each, in the server's logins too
    with serving(data, "--import", str(tmp_path / "pairs.jsonl"), "--overlap", str(OVERLAP)) as url:
        seen = []
        with pytest.raises(ValueError, match="judge must return one of a, b, tie, skip, not 'maybe'"):
            answer_comparisons(url, accounts[:1], lambda *card: seen.append(card) or "maybe", log_path=log)
        assert read_log(log) == []

        first = answer_comparisons(url, accounts, longer_wins, log_path=log, limit=5)
        assert len(first) == 5 and read_log(log) == first
        assert (first[0]["rater"], first[0]["prompt"], first[0]["a"], first[0]["b"]) == seen[0]  # ann's hand-out
        rest = answer_comparisons(url, accounts, longer_wins, log_path=log)
        exported = export_pairs(data, tmp_path / "pairs-export.jsonl")
    assert "imported 6 items" in (data / "server.log").read_text()

    answers = read_log(log)
    assert answers == first + rest and len(answers) == len(PAIRS) * OVERLAP  # nothing lost, nothing twice
    assert Counter(Counter(r["item"] for r in answers).values()) == {OVERLAP: len(PAIRS)}  # each item twice
    assert len({(r["rater"], r["item"]) for r in answers}) == len(answers)  # by two raters
    assert {r["rater"] for r in answers} == set(NAMES)  # in turns: the first account did not take everything
    shown = {(r["prompt"], frozenset((r["a"], r["b"]))) for r in answers}
    assert shown == {(p, frozenset((a, b))) for p, a, b in PAIRS}  # the texts exactly as imported
    assert all(r["choice"] == longer_wins(r["rater"], r["prompt"], r["a"], r["b"]) for r in answers)
    assert Counter(r["choice"] for r in answers)["tie"] == 2 * OVERLAP
    assert Counter((p["prompt"], p["chosen"], p["rejected"]) for p in exported) == as_pairs(answers)
    assert len(exported) == 3 * OVERLAP  # three pairs have a longer response

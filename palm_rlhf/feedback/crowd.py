"""Simulated raters answering comparisons through the real app over HTTP, as people would.

    accounts = make_accounts("feedback_data", ["ann", "bob", "cy"])
    with serving("feedback_data", "--import", "pairs.jsonl", "--overlap", "2") as url:
        answers = answer_comparisons(url, accounts, judge, log_path="answers.jsonl")

1. Each account logs in through the form (CSRF token from the cookie), as `loadtest.Rater` does.
2. The raters take turns, one card each, so that with a small --overlap the first account does not
   answer everything: judge(username, prompt, a, b) picks "a", "b", "tie" or "skip", and the answer
   is POSTed as htmx sends it; the reply holds the next card. A rater stops at "All done".
3. An answer the app acknowledged (HTTP 200) is appended to `log_path` and flushed at once, so a
   crash loses no answer it had written; only the one between the reply and its line can go.
4. Run again with the same accounts and log, and it carries on: the app hands each rater only items
   it has not answered, its unanswered hand-out first; the log's earlier lines stay.

The client touches no database: everything goes through HTTP, so it checks the app as a rater meets it.
Turns run in one thread, so the judge (a reward model, say) need not be thread-safe.
"""
import html
import json
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .loadtest import ITEM, Rater, free_port, start_server

CHOICES = ("a", "b", "tie", "skip")
Judge = Callable[[str, str, str, str], str]  # (username, prompt, a, b) -> one of CHOICES
# the card's texts, escaped by Django's templates: no "<" inside them can end a match early
PROMPT = re.compile(r'<pre class="text prompt">(.*?)</pre>', re.S)
TEXT = re.compile(r'<pre class="text">(.*?)</pre>', re.S)
TITLE = re.compile(r"<title>(.*?)</title>", re.S)


@dataclass
class Card:
    item: int
    prompt: str
    a: str
    b: str


def parse_card(page: str) -> Card | None:
    """The comparison a card shows (templates/feedback/card.html), its texts exactly as stored, or None
    when it says All done."""
    item, prompt = ITEM.search(page), PROMPT.search(page)
    if item is None and "<h1>All done</h1>" in page:
        return None
    pair = page.find('<div class="pair">')
    texts = TEXT.findall(page, pair) if pair >= 0 else []
    if item is None or prompt is None or len(texts) != 2:  # a login page after a lost session, say
        title = TITLE.search(page)
        shown = html.unescape(title.group(1)) if title else " ".join(page.split())[:80]
        raise RuntimeError(f"not a comparison card: {shown!r}")
    return Card(int(item.group(1)), *(html.unescape(text) for text in (prompt.group(1), *texts)))


def answer_card(rater: Rater, card: Card, judge: Judge) -> tuple[dict | None, Card | None]:
    """Judge one card and send the answer; the record if the app acknowledged it, and the next card."""
    choice = judge(rater.name, card.prompt, card.a, card.b)
    if choice not in CHOICES:
        raise ValueError(f"judge must return one of {', '.join(CHOICES)}, not {choice!r}")
    headers = {"HX-Request": "true", "X-CSRFToken": rater.csrf()}
    status, page = rater.request(f"/answer/{card.item}/", {"choice": choice}, headers)
    if status not in (200, 409):  # 409: answered before, or its hand-out ran out; the next card comes with it
        raise RuntimeError(f"{rater.name}: the answer to item {card.item} got HTTP {status}: {page[:80]!r}")
    following = parse_card(page)  # before the record: a 200 that is no card (a login page) acknowledges nothing
    if status == 409:
        return None, following
    record = {"rater": rater.name, "item": card.item, "prompt": card.prompt, "a": card.a, "b": card.b,
              "choice": choice}
    return record, following


def turns(cards: list):
    """Indices of the raters in turn, skipping those with nothing left, until none has a card."""
    while any(card is not None for card in cards):
        for i, card in enumerate(cards):
            if card is not None:
                yield i


def answer_comparisons(base_url: str, accounts: list[tuple[str, str]], judge: Judge, log_path=None,
                       limit: int | None = None) -> list[dict]:
    """Each (username, password) account logs in and answers /compare/ cards until the app says All done
    (or `limit` answers in all): judge(username, prompt, a, b) -> "a" | "b" | "tie" | "skip". Returns one
    dict per acknowledged (HTTP 200) answer: rater, item, prompt, a, b, choice; each is also appended to
    `log_path` (JSONL) as it comes."""
    raters = [Rater(base_url.rstrip("/"), name, password, "compare") for name, password in accounts]
    cards = [parse_card(rater.log_in()) for rater in raters]
    acked = []
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    try:
        for i in turns(cards):
            if limit is not None and len(acked) >= limit:
                break
            record, cards[i] = answer_card(raters[i], cards[i], judge)
            if record is not None:
                acked.append(record)
                if log:
                    log.write(json.dumps(record, ensure_ascii=False) + "\n")
                    log.flush()  # now, not at exit: a crash must not take acknowledged answers with it
    finally:
        if log:
            log.close()
    return acked


def read_log(path) -> list[dict]:
    """The answers an answer_comparisons log holds, oldest first; none if there is no log yet."""
    if not Path(path).exists():
        return []
    with open(path, encoding="utf-8") as file:
        # split at "\n" only, as the app's own readers do: the texts may hold U+2028 and kin raw
        return [json.loads(line) for line in file.read().split("\n") if line.strip()]


def make_accounts(data_dir, names: list[str]) -> list[tuple[str, str]]:
    """A rater account per name in the app's data folder, each with a fresh random password, through
    `adduser NAME --password-file -` (the checks every account gets); returns (name, password) pairs,
    the only copy of the passwords: keep them to log in again in a later run."""
    accounts = []
    for name in names:
        password = secrets.token_urlsafe(18)
        command = [sys.executable, "-m", "palm_rlhf.feedback", "--data-dir", str(data_dir), "adduser", name,
                   "--password-file", "-"]  # on stdin: an argument would show in `ps`
        done = subprocess.run(command, input=password + "\n", capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"adduser {name}: {done.stderr.strip()[-300:]}")
        accounts.append((name, password))
    return accounts


@contextmanager
def serving(data_dir, *options: str, threads: int = 4):
    """The real app (`serve --host 127.0.0.1 --port P`, with more `options` if given) in a subprocess
    while the block runs; yields its base URL. The folder must hold the app's database already
    (make_accounts makes it): `serve` refuses a folder holding only its log."""
    port = free_port()
    server = start_server(Path(data_dir), port, threads, *options)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)

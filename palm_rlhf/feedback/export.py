"""Answers out as the JSONL that train_reward.py (ratings) and DPO (pairs) read, and strict readers.

ratings: {"prompt": str, "response": str, "rating": int in 1..K, "num_bins": K}, one line per rater's
         answer, so an item judged by three raters gives three lines (the reward model sees their
         disagreement); K is the scale the rater saw, as files imported with different --num-bins
         put ratings of several scales in one database.
pairs:   {"prompt": str, "chosen": str, "rejected": str}; ties and skips carry no preference and
         are left out.
"""
import json
from pathlib import Path

from .models import Answer, Item

RATING_KEYS = {"prompt", "response", "rating", "num_bins"}
PAIR_KEYS = {"prompt", "chosen", "rejected"}
TEXT_KEYS = {"prompt", "response", "chosen", "rejected"}


def answered(kind: str):
    return (
        Answer.objects.filter(item__kind=kind, answered_at__isnull=False)
        .select_related("item__prompt", "item__first", "item__second")
        .order_by("id")
    )


def rating_records():
    for answer in answered(Item.RATE):
        yield {"prompt": answer.item.prompt.text, "response": answer.item.first.text, "rating": answer.rating,
               "num_bins": answer.num_bins}


def pair_records():
    for answer in answered(Item.COMPARE).filter(choice__in=["a", "b"]):
        a, b = answer.item.first.text, answer.item.second.text
        chosen, rejected = (a, b) if answer.choice == "a" else (b, a)
        yield {"prompt": answer.item.prompt.text, "chosen": chosen, "rejected": rejected}


def jsonl_lines(records):
    for record in records:
        yield json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(records, path) -> int:
    lines = list(jsonl_lines(records))
    Path(path).write_text("".join(lines), encoding="utf-8")
    return len(lines)


class BadFile(ValueError):
    """A file that cannot be read as asked; the message names the file and line, on one line."""


def numbered_lines(path):
    """(line number, line) for each non-blank line of a UTF-8 file (a byte-order mark is dropped).
    Lines end at "\n" only: str.splitlines would also cut at U+2028, U+2029 and U+0085, which
    json.dumps(ensure_ascii=False) leaves raw inside strings."""
    try:
        file = open(path, "rb")
    except OSError as error:
        raise BadFile(f"{path}: {error.strerror}") from None
    with file:
        for number, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise BadFile(f"{path}:{number}: not valid UTF-8 (byte {error.start + 1} of the line)") from None
            if line.strip():
                yield number, line


def json_objects(path):
    """(line number, object) for each non-blank line of a JSONL file."""
    for number, line in numbered_lines(path):
        try:
            record = json.loads(line.rstrip("\r\n"))  # else an error at the end points past the line
        except json.JSONDecodeError as error:
            raise BadFile(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(record, dict):
            raise BadFile(f"{path}:{number}: each line must be a JSON object {{...}}, not {line.strip()[:40]}")
        yield number, record


def _read(path, keys: set, check) -> list[dict]:
    records = []
    for number, record in json_objects(path):
        if set(record) != keys or not all(isinstance(record[k], str) for k in keys & TEXT_KEYS) or not check(record):
            raise BadFile(f"{path}:{number}: not a valid record: {json.dumps(record)[:120]}")
        records.append(record)
    return records


def read_ratings(path) -> list[dict]:
    def on_its_scale(r):
        return type(r["num_bins"]) is int and r["num_bins"] >= 2 and type(r["rating"]) is int \
            and 1 <= r["rating"] <= r["num_bins"]

    return _read(path, RATING_KEYS, on_its_scale)


def read_pairs(path) -> list[dict]:
    return _read(path, PAIR_KEYS, lambda r: True)

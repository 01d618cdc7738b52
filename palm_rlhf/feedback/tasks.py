"""Where items come from: responses imported from JSONL, or sampled from a checkpoint in the background.

Every response becomes a rating item, and every pair of responses to the same prompt becomes a
comparison item. A response is stored once per prompt and text (its content key), so importing a
file again adds nothing and no comparison pits a response against its own copy. Generation is
resumable: a prompt that already has its samples from a checkpoint is skipped, so restarting
`serve` with the same arguments carries on where it stopped.
"""
import itertools
import json
import random
import threading

from django.db import connection, transaction

from .export import numbered_lines
from .models import GenerationJob, Item, Prompt, Response, content_key


def read_prompts(path) -> list[str]:
    """Prompts from a .jsonl file ({"prompt": ...} per line) or a text file (one per non-empty line)."""
    lines = [line.rstrip("\r\n") for _, line in numbered_lines(path)]
    if str(path).endswith(".jsonl"):
        return [json.loads(line)["prompt"] for line in lines]
    return lines


def read_responses(path) -> dict[str, list[str]]:
    """Responses grouped by prompt, from lines {"prompt", "response"} or {"prompt", "responses": [...]}."""
    grouped: dict[str, list[str]] = {}
    for number, line in numbered_lines(path):
        record = json.loads(line)
        texts = record["responses"] if "responses" in record else [record.get("response")]
        if not isinstance(record.get("prompt"), str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{path}:{number}: need a string 'prompt' and 'response' (or a list 'responses')")
        grouped.setdefault(record["prompt"], []).extend(texts)
    return grouped


@transaction.atomic
def add_responses(prompt_text: str, texts: list[str], source: str, num_bins: int = 5, overlap: int = 1) -> int:
    """Store the responses not stored already and make their items; returns how many items were made."""
    prompt = Prompt.objects.filter(text=prompt_text).first() or Prompt.objects.create(text=prompt_text)
    old = list(prompt.responses.all())
    new = []
    for text in dict.fromkeys(texts):  # a text given twice is one response
        response, made = Response.objects.get_or_create(
            key=content_key(prompt_text, text), defaults={"prompt": prompt, "text": text, "source": source})
        if made:
            new.append(response)
    items = [Item(kind=Item.RATE, prompt=prompt, first=r, num_bins=num_bins, overlap=overlap) for r in new]
    for a, b in itertools.combinations(old + new, 2):
        if b not in new:
            continue
        # random sides, so that a rater's habit of picking the left one does not favour any source
        if random.random() < 0.5:
            a, b = b, a
        items.append(Item(kind=Item.COMPARE, prompt=prompt, first=a, second=b, num_bins=num_bins, overlap=overlap))
    Item.objects.bulk_create(items)
    return len(items)


def import_jsonl(path, num_bins: int = 5, overlap: int = 1) -> int:
    return sum(
        add_responses(prompt, texts, source=str(path), num_bins=num_bins, overlap=overlap)
        for prompt, texts in read_responses(path).items()
    )


def sample_responses(palm, prompt: str, num_samples: int, seq_len: int, temperature: float) -> list[str]:
    """num_samples continuations of one prompt, in the tokens of the model's own tokenizer (saved
    with its checkpoint); seq_len counts prompt and response tokens together."""
    import torch

    tokenizer = palm.tokenizer
    if tokenizer is None:
        raise ValueError(f"this {palm.num_tokens}-token model has no tokenizer to read prompts with (palm.tokenizer = ...)")
    ids = tokenizer.encode(prompt)
    if len(ids) >= seq_len:
        raise ValueError(f"prompt of {len(ids)} tokens leaves no room in seq_len={seq_len}: {prompt[:40]!r}")
    with torch.no_grad():
        tokens = palm.generate(seq_len, prompt=ids.repeat(num_samples, 1), temperature=temperature, eos_token=tokenizer.eos_id)
    return [tokenizer.decode(row) for row in tokens]  # tokens: (num_samples, seq_len - len(ids))


def run_generation(job: GenerationJob, num_bins: int, overlap: int, seq_len: int, temperature: float) -> None:
    """Sample every prompt of the job's file, recording progress on the job row as it goes."""
    from palm_rlhf.palm import PaLM

    try:
        prompts = read_prompts(job.prompts_file)
        GenerationJob.objects.filter(pk=job.pk).update(total=len(prompts))
        palm = PaLM.from_pretrained(job.checkpoint).eval()
        for done, prompt in enumerate(prompts, start=1):
            have = Response.objects.filter(prompt__text=prompt, source=job.checkpoint).count()
            missing = job.samples_per_prompt - have
            if missing > 0:
                texts = sample_responses(palm, prompt, missing, seq_len, temperature)
                add_responses(prompt, texts, source=job.checkpoint, num_bins=num_bins, overlap=overlap)
            GenerationJob.objects.filter(pk=job.pk).update(done=done)
        GenerationJob.objects.filter(pk=job.pk).update(status=GenerationJob.FINISHED)
    except Exception as error:  # shown on the tasks page instead of dying silently in a thread
        GenerationJob.objects.filter(pk=job.pk).update(status=GenerationJob.FAILED, error=repr(error))
        raise


def _generate_in_thread(*args) -> None:
    try:
        run_generation(*args)
    finally:
        connection.close()  # each thread has its own connection; do not leave this one open


def start_generation(checkpoint, prompts_file, samples: int, num_bins: int, overlap: int,
                     seq_len: int, temperature: float, background: bool = True) -> GenerationJob:
    job = GenerationJob.objects.create(
        checkpoint=str(checkpoint), prompts_file=str(prompts_file), samples_per_prompt=samples
    )
    args = (job, num_bins, overlap, seq_len, temperature)
    if background:
        threading.Thread(target=_generate_in_thread, args=args, daemon=True, name="feedback-generation").start()
    else:
        run_generation(*args)
    return job

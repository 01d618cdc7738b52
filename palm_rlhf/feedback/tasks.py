"""Where items come from: responses imported from JSONL, or sampled from a checkpoint in the background.

Every response becomes a rating item, and every pair of responses to the same prompt becomes a
comparison item. A file of pairs instead ({"prompt", "pair": [a, b]} lines: the pairs a chooser
picked, as iterated RLHF publishes them) makes one comparison item per pair and nothing else. A
response is stored once per prompt and text (its content key), so importing a file again adds
nothing and no comparison pits a response against its own copy. Generation is resumable: a prompt
that already has its samples from a checkpoint is skipped, so restarting `serve` with the same
arguments carries on where it stopped.
"""
import itertools
import json
import random
import threading
from dataclasses import dataclass

from django.db import connection, transaction
from django.db.models import Q

from .export import BadFile, json_objects, numbered_lines
from .models import GenerationJob, Item, Prompt, Response, content_key


def checked_text(where: str, name: str, value) -> str:
    """A prompt or response as the database and a rater can take it, or one line saying why not."""
    if not isinstance(value, str):
        raise BadFile(f"{where}: {name} must be a string, not {json.dumps(value)[:40]}")
    if not value.strip():
        raise BadFile(f"{where}: {name} is empty")
    if "\0" in value:  # PostgreSQL cannot store it
        raise BadFile(f"{where}: {name} holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\ud800" escapes decode to a lone surrogate, which no encoding holds
        raise BadFile(f"{where}: {name} holds a lone surrogate (an unpaired \\ud800-\\udfff escape)") from None
    return value


def read_prompts(path) -> list[str]:
    """Prompts from a .jsonl file ({"prompt": ...} per line) or a text file (one per non-empty line)."""
    if str(path).endswith(".jsonl"):
        return [checked_text(f"{path}:{number}", "'prompt'", record.get("prompt"))
                for number, record in json_objects(path)]
    return [checked_text(f"{path}:{number}", "the prompt", line.rstrip("\r\n"))
            for number, line in numbered_lines(path)]


SHAPES = ("response", "responses", "pair")
LINE_KINDS = {False: "'response'/'responses'", True: "'pair'"}


def response_line(where: str, record: dict) -> list[str]:
    """The texts of a line {"prompt", "response": str} or {"prompt", "responses": [str, ...]}."""
    if "response" in record:
        return [checked_text(where, "'response'", record["response"])]
    if isinstance(record["responses"], list) and record["responses"]:
        return [checked_text(where, f"'responses'[{i}]", text) for i, text in enumerate(record["responses"])]
    # a string here was taken for a list of its characters
    raise BadFile(f"{where}: 'responses' must be a non-empty list of strings, "
                  f"not {json.dumps(record['responses'])[:40]}")


def pair_line(where: str, record: dict) -> tuple[str, str]:
    """The two texts of a line {"prompt", "pair": [a, b]}: two different responses to compare."""
    pair = record["pair"]
    if not isinstance(pair, list) or len(pair) != 2:
        raise BadFile(f"{where}: 'pair' must be a list of two strings, not {json.dumps(pair)[:40]}")
    a, b = (checked_text(where, f"'pair'[{i}]", text) for i, text in enumerate(pair))
    if a == b:  # one stored response: there would be nothing to compare
        raise BadFile(f"{where}: 'pair' holds the same response twice")
    return a, b


@dataclass
class ToImport:
    responses: dict[str, list[str]]  # prompt -> texts: each rated, and paired with the prompt's others
    pairs: list[tuple[str, str, str]]  # (prompt, a, b): one comparison each, and nothing else


def read_import(path) -> ToImport:
    """Responses grouped by prompt, or pairs, from a JSONL file; every line is checked before any is
    used, so a bad one stops the whole file."""
    found = ToImport({}, [])
    first = None  # (line number, whether it gave a pair): the kind of line the file holds
    for number, record in json_objects(path):
        where = f"{path}:{number}"
        if sum(key in record for key in SHAPES) != 1:
            raise BadFile(f"{where}: give 'response' (a string), 'responses' (a list of strings) or 'pair' "
                          "(a list of two), one of them")
        is_pair = "pair" in record
        first = first or (number, is_pair)
        # Responses of a prompt are paired with every response stored for it, so a response line
        # beside pair lines would add comparisons the chooser did not pick, depending on line order.
        if is_pair != first[1]:
            raise BadFile(f"{where}: a {LINE_KINDS[is_pair]} line in a file of {LINE_KINDS[first[1]]} lines "
                          f"(line {first[0]}): import pairs and responses from separate files")
        prompt = checked_text(where, "'prompt'", record.get("prompt"))
        if is_pair:
            found.pairs.append((prompt, *pair_line(where, record)))
        else:
            found.responses.setdefault(prompt, []).extend(response_line(where, record))
    # a pair given twice, in either order, is one pair
    found.pairs = list({(p, frozenset((a, b))): (p, a, b) for p, a, b in found.pairs}.values())
    return found


def stored_prompt(text: str) -> Prompt:
    return Prompt.objects.filter(text=text).first() or Prompt.objects.create(text=text)


def stored_response(prompt: Prompt, text: str, source: str) -> tuple[Response, bool]:
    """The response with this prompt and text, made now if new; and whether it was."""
    return Response.objects.get_or_create(key=content_key(prompt.text, text),
                                          defaults={"prompt": prompt, "text": text, "source": source})


@transaction.atomic
def add_responses(prompt_text: str, texts: list[str], source: str, num_bins: int = 5, overlap: int = 1) -> int:
    """Store the responses not stored already and make their items; returns how many items were made."""
    prompt = stored_prompt(prompt_text)
    old = list(prompt.responses.all())
    new = []
    for text in dict.fromkeys(texts):  # a text given twice is one response
        response, made = stored_response(prompt, text, source)
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


def pair_items(prompt_text: str, a: str, b: str):
    """The comparison items of these two responses, on either side."""
    ka, kb = content_key(prompt_text, a), content_key(prompt_text, b)
    either_way = Q(first__key=ka, second__key=kb) | Q(first__key=kb, second__key=ka)
    return Item.objects.filter(either_way, kind=Item.COMPARE)


@transaction.atomic
def add_pair(prompt_text: str, a: str, b: str, source: str, overlap: int = 1) -> int:
    """Store both responses if new and make one comparison of them, unless one is stored already
    (either way round); no rating item, and no pair with the prompt's other responses. Returns how
    many items were made: 1 or 0."""
    if a == b:
        raise ValueError("a pair needs two different responses")
    prompt = stored_prompt(prompt_text)
    first, second = (stored_response(prompt, text, source)[0] for text in (a, b))
    if pair_items(prompt_text, a, b).exists():
        return 0
    if random.random() < 0.5:  # random sides, as in add_responses: the chooser's order is no signal to show
        first, second = second, first
    Item.objects.create(kind=Item.COMPARE, prompt=prompt, first=first, second=second, overlap=overlap)
    return 1


def other_options(num_bins: int, overlap: int) -> Q:
    """Items whose options are not these: another overlap or, for rating items, another scale."""
    return ~Q(overlap=overlap) | Q(kind=Item.RATE) & ~Q(num_bins=num_bins)


def kept_items(prompt_text: str, texts: list[str], num_bins: int, overlap: int) -> int:
    """How many items of these responses were stored before with other options, which they keep."""
    keys = {content_key(prompt_text, text) for text in texts}
    theirs = Item.objects.filter(first__key__in=keys).filter(Q(second__isnull=True) | Q(second__key__in=keys))
    return theirs.filter(other_options(num_bins, overlap)).count()


@dataclass
class Imported:
    made: int  # items made now, with the options given
    kept: int  # items of the file's responses stored before with other options: they keep theirs


def import_jsonl(path, num_bins: int = 5, overlap: int = 1) -> Imported:
    """Import a whole file or, when any line is bad or the database fails, nothing of it."""
    found = read_import(path)
    with transaction.atomic():
        kept = sum(kept_items(prompt, texts, num_bins, overlap) for prompt, texts in found.responses.items())
        kept += sum(pair_items(*pair).filter(other_options(num_bins, overlap)).count() for pair in found.pairs)
        made = sum(add_responses(prompt, texts, source=str(path), num_bins=num_bins, overlap=overlap)
                   for prompt, texts in found.responses.items())
        made += sum(add_pair(*pair, source=str(path), overlap=overlap) for pair in found.pairs)
    return Imported(made, kept)


def rating_scales() -> list[int]:
    """The K of every 1..K scale the rating items use."""
    return sorted(set(Item.objects.filter(kind=Item.RATE).values_list("num_bins", flat=True)))


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


def run_generation(job: GenerationJob, prompts: list[str], num_bins: int, overlap: int, seq_len: int,
                   temperature: float) -> None:
    """Sample every prompt, recording progress on the job row as it goes."""
    from palm_rlhf import PaLM

    try:
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
    prompts = read_prompts(prompts_file)  # a bad line stops it here, in one line, not later in a thread
    job = GenerationJob.objects.create(checkpoint=str(checkpoint), prompts_file=str(prompts_file),
                                       samples_per_prompt=samples, total=len(prompts))
    args = (job, prompts, num_bins, overlap, seq_len, temperature)
    if background:
        threading.Thread(target=_generate_in_thread, args=args, daemon=True, name="feedback-generation").start()
    else:
        run_generation(*args)
    return job

"""Prompts, their responses, the items raters judge, and one Answer row per (item, rater).

An Answer row is made when an item is handed to a rater and filled in when they submit; the unique
constraint on (item, rater) is what guarantees that each rater sees each item once and can never
leave two answers for it, whatever the web layer does.
"""
import hashlib
import json
import secrets

from django.conf import settings
from django.db import models


class Prompt(models.Model):
    text = models.TextField()

    def __str__(self):
        return self.text[:60]


def content_key(prompt: str, response: str) -> str:
    return hashlib.sha256(json.dumps([prompt, response]).encode()).hexdigest()


class Response(models.Model):
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="responses")
    text = models.TextField()
    source = models.CharField(max_length=500, help_text="checkpoint folder or imported file")
    # content_key(prompt, text): one row per response text, whichever file or checkpoint brings it;
    # null only on copies made before the key existed
    key = models.CharField(max_length=64, unique=True, null=True, editable=False)

    def __str__(self):
        return self.text[:60]


class Item(models.Model):
    """One thing to judge: a response to rate 1..num_bins, or two responses to compare."""

    RATE, COMPARE = "rate", "compare"
    kind = models.CharField(max_length=7, choices=[(RATE, "rate"), (COMPARE, "compare")])
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="items")
    first = models.ForeignKey(Response, on_delete=models.CASCADE, related_name="+")
    second = models.ForeignKey(Response, on_delete=models.CASCADE, related_name="+", null=True, blank=True)
    num_bins = models.PositiveSmallIntegerField(default=5, help_text="ratings run 1..num_bins")
    overlap = models.PositiveSmallIntegerField(default=1, help_text="how many raters should judge it")

    class Meta:
        indexes = [models.Index(fields=["kind", "id"])]

    def __str__(self):
        return f"{self.kind} #{self.pk}"


class Answer(models.Model):
    CHOICES = [("a", "A is better"), ("b", "B is better"), ("tie", "tie"), ("skip", "skip")]
    item = models.ForeignKey(Item, on_delete=models.CASCADE, related_name="answers")
    rater = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="answers")
    assigned_at = models.DateTimeField(auto_now_add=True)
    answered_at = models.DateTimeField(null=True, blank=True, db_index=True)
    rating = models.PositiveSmallIntegerField(null=True, blank=True)
    # the scale the rating was given on, copied from the item when answered: a rating of 5 means
    # nothing without it, and files imported with different --num-bins mix scales in one database
    num_bins = models.PositiveSmallIntegerField(null=True, blank=True, help_text="the rating is on 1..num_bins")
    choice = models.CharField(max_length=4, choices=CHOICES, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["item", "rater"], name="one_answer_per_rater")]


class GenerationJob(models.Model):
    """Background sampling from a checkpoint; `done` counts prompts finished, for the progress bar."""

    RUNNING, FINISHED, FAILED = "running", "finished", "failed"
    checkpoint = models.CharField(max_length=500)
    prompts_file = models.CharField(max_length=500)
    samples_per_prompt = models.PositiveSmallIntegerField()
    total = models.PositiveIntegerField(default=0)
    done = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=8, default=RUNNING)
    error = models.TextField(blank=True)
    started_at = models.DateTimeField(auto_now_add=True)

    @property
    def percent(self):
        return round(100 * self.done / self.total) if self.total else 0


def new_token():
    return secrets.token_urlsafe(24)


class LoginCounter(models.Model):
    """One count the login throttle keeps (see throttle.py): failed logins of a client address, of an
    account, or of an (account, address) pair, or an address's successful logins into an account.

    Each row carries its own expiry, in time.time() seconds; rows past it count as absent and are
    deleted as failures come in. Nothing else removes a row, so no flood of new names can push one out.
    """

    key = models.CharField(max_length=80, unique=True, help_text="kind:digest of the account and/or address")
    count = models.PositiveIntegerField(default=0)
    expires = models.FloatField(db_index=True)
    wait_until = models.FloatField(default=0.0, help_text="accounts: no try from an untrusted client before this")


class Invite(models.Model):
    token = models.CharField(max_length=64, unique=True, default=new_token)
    is_staff = models.BooleanField(default=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    used_by = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="invite"
    )

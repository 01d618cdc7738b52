"""Pages and htmx endpoints.

A rater only ever reads and writes Answer rows whose rater is themself: the queries below all
filter on request.user, and staff-only pages (stats, export, tasks, invites) refuse everyone else.
"""
import random
from datetime import timedelta
from functools import wraps

from django.conf import settings
from django.contrib import admin
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.db import IntegrityError, transaction
from django.db.models import Count, F, Q
from django.http import HttpResponse, HttpResponseForbidden, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from . import export, stats
from .accounts import SignUpForm
from .models import Answer, GenerationJob, Invite, Item, Prompt, Response
from .throttle import LoginForm, refused

PAGES = {Item.RATE: "rate", Item.COMPARE: "compare"}


def staff_required(view):
    @wraps(view)
    @login_required
    def wrapped(request, *args, **kwargs):
        if not request.user.is_staff:
            return HttpResponseForbidden("Only staff can see this page.")
        return view(request, *args, **kwargs)

    return wrapped


def plain(text: str, status: int) -> HttpResponse:
    return HttpResponse(text, status=status, content_type="text/plain; charset=utf-8")


# ---- handing out items ----


def open_items(rater, kind: str):
    """Items this rater has not been given whose answers (plus live hand-outs) are below the overlap."""
    live = timezone.now() - timedelta(seconds=settings.FEEDBACK_LEASE_SECONDS)
    taken = Count("answers", filter=Q(answers__answered_at__isnull=False) | Q(answers__assigned_at__gt=live))
    return (
        Item.objects.filter(kind=kind)
        .exclude(answers__rater=rater)
        .annotate(taken=taken)
        .filter(taken__lt=F("overlap"))
        .order_by("-taken", "id")  # finish started items first, so agreement figures fill in early
    )


def current_answer(rater, kind: str) -> Answer | None:
    """The rater's unanswered hand-out of this kind, or a new one; None when nothing is left."""
    pending = Answer.objects.filter(rater=rater, item__kind=kind, answered_at__isnull=True)
    for _ in range(3):
        if answer := pending.select_related("item__prompt", "item__first", "item__second").first():
            return answer
        # The search runs outside the write lock; the lock is held only to re-check one item and
        # insert. Shuffling the first few keeps concurrent raters from all queueing for one item.
        candidates = list(open_items(rater, kind)[:8])
        if not candidates:
            return None
        random.shuffle(candidates)
        for item in candidates:
            if claim(rater, item):
                break
    return pending.first()


def claim(rater, item: Item) -> bool:
    try:
        with transaction.atomic():
            # the row lock serialises claims where the database has row locks; SQLite is already
            # serialised by its IMMEDIATE transactions
            Item.objects.select_for_update().filter(pk=item.pk).first()
            if not open_items(rater, item.kind).filter(pk=item.pk).exists():
                return False
            Answer.objects.create(item=item, rater=rater)
            return True
    except IntegrityError:  # the same rater claimed it from another tab a moment ago
        return True


def card_context(rater, kind: str) -> dict:
    answer = current_answer(rater, kind)
    context = {"kind": kind, "item": answer.item if answer else None}
    if answer and kind == Item.RATE:
        context["bins"] = range(1, answer.item.num_bins + 1)
    return context


def throttle_status(response):
    """429 for a login page whose form the throttle turned away (Django's login views answer 200)."""
    form = (getattr(response, "context_data", None) or {}).get("form")
    if form is not None and refused(form):
        response.status_code = 429
    return response


class Login(auth_views.LoginView):
    template_name = "feedback/login.html"
    authentication_form = LoginForm

    def form_invalid(self, form):
        return throttle_status(super().form_invalid(form))


def admin_login(request):
    """The admin's own login page (throttled through admin.site.login_form), with the app's status codes."""
    return throttle_status(admin.site.login(request))


@login_required
def home(request):
    mine = Answer.objects.filter(rater=request.user, answered_at__isnull=False)
    modes = [
        {"kind": kind, "page": PAGES[kind], "done": mine.filter(item__kind=kind).count(),
         "waiting": open_items(request.user, kind).count()
         + Answer.objects.filter(rater=request.user, item__kind=kind, answered_at__isnull=True).count()}
        for kind in (Item.RATE, Item.COMPARE)
    ]
    return render(request, "feedback/home.html", {"modes": modes})


@login_required
def judge(request, kind: str):
    return render(request, "feedback/judge.html", card_context(request.user, kind))


def parse_answer(item: Item, data) -> dict:
    """The fields an answer stores: a rating with its scale, or a choice."""
    if item.kind == Item.RATE:
        raw = data.get("rating", "")
        # compared as text: int() of 5000 digits raises Python's own "Exceeds the limit" message
        if raw not in [str(k) for k in range(1, item.num_bins + 1)]:
            raise ValueError(f"A rating must be a whole number from 1 to {item.num_bins}, not {raw[:20]!r}.")
        return {"rating": int(raw), "num_bins": item.num_bins}
    choice = data.get("choice", "")
    if choice not in dict(Answer.CHOICES):
        raise ValueError(f"A choice must be one of {', '.join(dict(Answer.CHOICES))}, not {choice[:20]!r}.")
    return {"choice": choice}


def next_card(request, kind: str, notice: str, status: int) -> HttpResponse:
    """The rater's next card (a fragment for htmx, else the whole page) with a line saying why."""
    template = "feedback/card.html" if request.headers.get("HX-Request") else "feedback/judge.html"
    return render(request, template, {**card_context(request.user, kind), "notice": notice}, status=status)


@login_required
@require_POST
def answer(request, item_id: int):
    given = Answer.objects.filter(item_id=item_id, rater=request.user).select_related("item").first()
    if given is None:
        return plain(f"Item {item_id} was not given to you.", 404)
    item = given.item
    try:
        values = parse_answer(item, request.POST)
    except ValueError as error:
        return plain(str(error), 400)
    with transaction.atomic():
        # the item's row lock (SQLite: the IMMEDIATE write lock) serialises answers to one item, so the
        # count below cannot change before the update: an item never gets more answers than its overlap
        Item.objects.select_for_update().filter(pk=item.pk).first()
        mine = Answer.objects.filter(pk=given.pk, answered_at__isnull=True)
        if not mine.exists():
            notice = f"You had already answered item #{item_id}; an answer cannot be changed."
        elif item.answers.filter(answered_at__isnull=False).count() >= item.overlap:
            mine.delete()  # the hand-out ran out and went to someone else, who answered first
            notice = f"Item #{item_id} was answered by someone else after your hand-out ran out."
        else:
            mine.update(answered_at=timezone.now(), **values)
            notice = ""
    if notice:  # 409, with the next card: a retry after a lost response must not leave the rater stuck
        return next_card(request, item.kind, notice + " Here is the next one.", status=409)
    if request.headers.get("HX-Request"):
        return render(request, "feedback/card.html", card_context(request.user, item.kind))
    return redirect(PAGES[item.kind])


# ---- staff pages ----


@staff_required
def stats_page(request):
    context = {
        "progress": stats.progress(),
        "raters": stats.rater_counts(),
        "histograms": stats.rating_histograms(),
        "choices": stats.choice_counts(),
        "agreement": stats.agreement(),
    }
    return render(request, "feedback/stats.html", context)


@staff_required
def export_jsonl(request, name: str):
    records = export.rating_records() if name == "ratings" else export.pair_records()
    response = StreamingHttpResponse(export.jsonl_lines(records), content_type="application/jsonl; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{name}.jsonl"'
    return response


def tasks_context():
    return {
        "jobs": GenerationJob.objects.order_by("-id"),
        "running": GenerationJob.objects.filter(status=GenerationJob.RUNNING).exists(),
        "counts": {"prompts": Prompt.objects.count(), "responses": Response.objects.count(),
                   "items": Item.objects.count()},
    }


@staff_required
def tasks(request):
    return render(request, "feedback/tasks.html", tasks_context())


@staff_required
def tasks_progress(request):
    return render(request, "feedback/tasks_progress.html", tasks_context())


@staff_required
def invites(request):
    if request.method == "POST":
        Invite.objects.create(created_by=request.user, is_staff=request.POST.get("is_staff") == "on")
        return redirect("invites")
    return render(request, "feedback/invites.html", {"invites": Invite.objects.select_related("used_by").order_by("-id")})


def accept_invite(request, token: str):
    invite = get_object_or_404(Invite, token=token, used_by__isnull=True)
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            with transaction.atomic():
                user = form.save(commit=False)
                user.is_staff = invite.is_staff
                user.save()
                # conditional update: of two people racing on one link, only one gets an account
                if not Invite.objects.filter(pk=invite.pk, used_by__isnull=True).update(used_by=user):
                    raise IntegrityError("invite already used")
        except IntegrityError:
            return plain("This invite has already been used.", 410)
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("home")
    return render(request, "feedback/accept_invite.html", {"form": form})

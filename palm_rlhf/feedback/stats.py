"""Figures for the stats page: work per rater, the rating histogram, and agreement between raters.

Agreement is pairwise: for every item judged by two raters or more, each pair of their answers
either agrees or not. For ratings an exact match and a match within one bin are both shown;
for comparisons, skips are left out and a tie only agrees with a tie.
"""
import itertools
from collections import Counter, defaultdict

from django.contrib.auth import get_user_model
from django.db.models import Count, Q

from .models import Answer, Item


def pairwise_agreement(groups, agree=lambda x, y: x == y) -> tuple[int, int]:
    """(agreeing pairs, all pairs) over groups of answers, one group per item."""
    pairs = [pair for group in groups for pair in itertools.combinations(group, 2)]
    return sum(agree(x, y) for x, y in pairs), len(pairs)


def answers_by_item(kind: str, field: str) -> list[list]:
    groups = defaultdict(list)
    rows = Answer.objects.filter(item__kind=kind, answered_at__isnull=False).exclude(choice="skip")
    for item_id, value in rows.values_list("item_id", field):
        groups[item_id].append(value)
    return [g for g in groups.values() if len(g) > 1]


def percent(part: int, whole: int):
    return round(100 * part / whole) if whole else None


def agreement() -> list[dict]:
    ratings, choices = answers_by_item(Item.RATE, "rating"), answers_by_item(Item.COMPARE, "choice")
    rows = [
        ("ratings, exact", ratings, lambda x, y: x == y),
        ("ratings, within one", ratings, lambda x, y: abs(x - y) <= 1),
        ("comparisons", choices, lambda x, y: x == y),
    ]
    result = []
    for label, groups, agree in rows:
        agreeing, pairs = pairwise_agreement(groups, agree)
        result.append({"label": label, "items": len(groups), "pairs": pairs, "percent": percent(agreeing, pairs)})
    return result


def bars(rows: list[tuple]) -> list[dict]:
    """Label/value rows with each bar's length as a percentage of the largest, for CSS bar charts."""
    top = max([value for _, value in rows], default=0) or 1
    return [{"label": label, "value": value, "percent": round(100 * value / top)} for label, value in rows]


def rater_counts() -> list[dict]:
    answered = Q(answers__answered_at__isnull=False)
    users = get_user_model().objects.annotate(
        rated=Count("answers", filter=answered & Q(answers__item__kind=Item.RATE)),
        compared=Count("answers", filter=answered & Q(answers__item__kind=Item.COMPARE)),
    )
    rows = [(u.username, u.rated + u.compared, u.rated, u.compared) for u in users if u.rated + u.compared]
    rows.sort(key=lambda row: -row[1])
    top = max([row[1] for row in rows], default=0) or 1
    return [
        {"label": name, "value": total, "rated": rated, "compared": compared,
         "rated_percent": 100 * rated / top, "compared_percent": 100 * compared / top}
        for name, total, rated, compared in rows
    ]


def rating_histograms() -> list[dict]:
    """One histogram per scale the ratings were given on (a 5 of 5 is not a 5 of 10)."""
    counts = Counter(Answer.objects.filter(rating__isnull=False).values_list("num_bins", "rating"))
    return [{"num_bins": k, "bars": bars([(str(r), counts[k, r]) for r in range(1, k + 1)])}
            for k in sorted({k for k, _ in counts})]


def choice_counts() -> list[dict]:
    counts = Counter(Answer.objects.exclude(choice="").values_list("choice", flat=True))
    return bars([(label, counts[key]) for key, label in Answer.CHOICES])


def progress() -> list[dict]:
    """Per kind: items, items with all the answers their overlap asks for, answers given."""
    result = []
    for kind in (Item.RATE, Item.COMPARE):
        items = Item.objects.filter(kind=kind).annotate(
            n=Count("answers", filter=Q(answers__answered_at__isnull=False))
        )
        total = items.count()
        complete = sum(1 for n, overlap in items.values_list("n", "overlap") if n >= overlap)
        answers = Answer.objects.filter(item__kind=kind, answered_at__isnull=False).count()
        result.append({"kind": kind, "total": total, "complete": complete, "answers": answers,
                       "percent": percent(complete, total) or 0})
    return result

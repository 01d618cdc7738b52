"""Data migrations, run on rows made before them."""
import pytest

pytest.importorskip("django", reason="the feedback app needs: pip install 'palm-rlhf[feedback]'")
pytest.importorskip("pytest_django", reason="the feedback tests need pytest-django")

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.db.migrations.executor import MigrationExecutor  # noqa: E402


@pytest.fixture(autouse=True)
def latest_afterwards():
    """Each test moves the schema back and forth; the ones after it need every migration applied."""
    yield
    call_command("migrate", verbosity=0)


def migrate_to(target):
    executor = MigrationExecutor(connection)
    executor.migrate([("feedback", target)])
    executor.loader.build_graph()
    return executor.loader.project_state([("feedback", target)]).apps


@pytest.mark.django_db(transaction=True)
def test_answers_given_before_0004_take_their_items_scale(django_user_model):
    old = migrate_to("0003_logincounter")
    prompt = old.get_model("feedback", "Prompt").objects.create(text="p")
    first = old.get_model("feedback", "Response").objects.create(prompt=prompt, text="r", source="test")
    Item = old.get_model("feedback", "Item")
    rate = Item.objects.create(kind="rate", prompt=prompt, first=first, num_bins=7)
    compare = Item.objects.create(kind="compare", prompt=prompt, first=first, second=first, num_bins=7)
    rater = old.get_model("auth", "User").objects.create(username="ann")
    Answer = old.get_model("feedback", "Answer")
    Answer.objects.create(item=rate, rater=rater, rating=6)
    Answer.objects.create(item=compare, rater=rater, choice="a")
    new = migrate_to("0004_answer_num_bins")
    scales = new.get_model("feedback", "Answer").objects.order_by("id").values_list("rating", "num_bins")
    assert list(scales) == [(6, 7), (None, None)]

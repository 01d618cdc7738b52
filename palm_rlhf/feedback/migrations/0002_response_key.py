"""Responses get a content key: the first copy of each (prompt, text) takes it, later copies keep none."""
from django.db import migrations, models

from palm_rlhf.feedback.models import content_key


def fill_keys(apps, schema_editor):
    Response = apps.get_model("feedback", "Response")
    seen = set()
    for response in Response.objects.select_related("prompt").order_by("id"):
        key = content_key(response.prompt.text, response.text)
        if key not in seen:
            seen.add(key)
            Response.objects.filter(pk=response.pk).update(key=key)


class Migration(migrations.Migration):

    dependencies = [
        ("feedback", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="response",
            name="key",
            field=models.CharField(editable=False, max_length=64, null=True),
        ),
        migrations.RunPython(fill_keys, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="response",
            name="key",
            field=models.CharField(editable=False, max_length=64, null=True, unique=True),
        ),
    ]

"""Each rating keeps its scale: answers given before take their item's num_bins."""
from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def fill_scales(apps, schema_editor):
    Answer, Item = apps.get_model("feedback", "Answer"), apps.get_model("feedback", "Item")
    Answer.objects.filter(rating__isnull=False).update(
        num_bins=Subquery(Item.objects.filter(pk=OuterRef("item_id")).values("num_bins")[:1]))


class Migration(migrations.Migration):

    dependencies = [
        ("feedback", "0003_logincounter"),
    ]

    operations = [
        migrations.AddField(
            model_name="answer",
            name="num_bins",
            field=models.PositiveSmallIntegerField(blank=True, help_text="the rating is on 1..num_bins", null=True),
        ),
        migrations.RunPython(fill_scales, migrations.RunPython.noop),
    ]

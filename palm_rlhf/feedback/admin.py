from django.contrib import admin

from .models import Answer, GenerationJob, Invite, Item, Prompt, Response

admin.site.register([Prompt, Response, GenerationJob, Invite])


@admin.register(Item)
class ItemAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "prompt", "num_bins", "overlap")
    list_filter = ("kind",)


@admin.register(Answer)
class AnswerAdmin(admin.ModelAdmin):
    list_display = ("item", "rater", "rating", "choice", "answered_at")
    list_filter = ("rater",)

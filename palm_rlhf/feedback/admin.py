from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin

from .accounts import AdminSignUpForm
from .models import Answer, GenerationJob, Invite, Item, Prompt, Response
from .throttle import AdminLoginForm

admin.site.login_form = AdminLoginForm  # the admin's own login page is throttled like the app's
admin.site.register([Prompt, Response, GenerationJob, Invite])


@admin.register(Item)
class ItemAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "prompt", "num_bins", "overlap")
    list_filter = ("kind",)


@admin.register(Answer)
class AnswerAdmin(admin.ModelAdmin):
    list_display = ("item", "rater", "rating", "num_bins", "choice", "answered_at")
    list_filter = ("rater",)


admin.site.unregister(get_user_model())


@admin.register(get_user_model())
class CheckedUserAdmin(UserAdmin):
    add_form = AdminSignUpForm  # the admin's add-user page checks names like adduser and invite links

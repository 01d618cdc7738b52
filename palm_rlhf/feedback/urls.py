from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.staticfiles.views import serve
from django.urls import path, re_path, register_converter

from . import views


class RowId:
    """A database id: digits below 2**63, the largest a 64-bit signed integer column holds; more is a 404."""

    regex = "[0-9]{1,19}"

    def to_python(self, value: str) -> int:
        if int(value) >= 2**63:
            raise ValueError("too large for a database id")  # Django answers 404, as for an id not found
        return int(value)

    def to_url(self, value: int) -> str:
        return str(value)


register_converter(RowId, "rowid")

urlpatterns = [
    path("", views.home, name="home"),
    path("rate/", views.judge, {"kind": "rate"}, name="rate"),
    path("compare/", views.judge, {"kind": "compare"}, name="compare"),
    path("answer/<rowid:item_id>/", views.answer, name="answer"),
    path("stats/", views.stats_page, name="stats"),
    re_path(r"^export/(?P<name>ratings|pairs)\.jsonl$", views.export_jsonl, name="export"),
    path("tasks/", views.tasks, name="tasks"),
    path("tasks/progress/", views.tasks_progress, name="tasks_progress"),
    path("invites/", views.invites, name="invites"),
    path("invite/<str:token>/", views.accept_invite, name="accept_invite"),
    path("login/", views.Login.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/login/", views.admin_login),  # before the admin's own route to the same page
    path("admin/", admin.site.urls),
    # static files straight from the app folders: a handful of small files, no collectstatic step
    re_path(r"^static/(?P<path>.*)$", serve, {"insecure": True}),
]

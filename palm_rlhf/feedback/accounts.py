"""Usernames: one normalisation and one check for every way an account is made (adduser, an invite
link, the admin's add-user page).

Login reads a username as Django's UsernameField does, NFKC-normalised and stripped, and a name is
stored the same way: `adduser ' m1'` once made an account that only the login of `m1` could reach.
Names that differ only in case are refused, as Django's own sign-up form refuses them, so `ALICE`
cannot stand beside `alice`. The rest is the User model's own rule, which create_user() skips:
at most 150 letters, digits and @ . + - _ (so no markup and no spaces).
"""
import unicodedata

from django.contrib.auth import get_user_model
from django.contrib.auth.forms import AdminUserCreationForm, UserCreationForm
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError

MAX_LENGTH = 150  # auth_user.username's column


def checked_username(raw: str) -> str:
    """The name as it will be stored and typed at login, or a ValidationError of one line."""
    name = unicodedata.normalize("NFKC", raw).strip()
    if not name:
        raise ValidationError("a username is needed", code="required")
    if len(name) > MAX_LENGTH:
        raise ValidationError(f"a username has at most {MAX_LENGTH} characters, not {len(name)}", code="max_length")
    try:
        UnicodeUsernameValidator()(name)
    except ValidationError:
        raise ValidationError("a username may hold only letters, digits and @ . + - _", code="invalid") from None
    if taken := get_user_model().objects.filter(username__iexact=name).first():
        raise ValidationError(f"a user named {taken.username!r} exists already", code="unique")
    return name


class CheckedUsername:
    """Mixed into a user-creation form, before it, so that its username passes checked_username()."""

    def clean_username(self):
        return checked_username(self.cleaned_data.get("username") or "")


class SignUpForm(CheckedUsername, UserCreationForm):
    pass


class AdminSignUpForm(CheckedUsername, AdminUserCreationForm):
    pass

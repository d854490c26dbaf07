"""Dashboard forms: they parse what people type (lines, shell words) into the shapes the
services take. Validation of meaning stays in the services; a service's refusal is put
back on the form next to the field it names (:func:`add_service_error`)."""

from __future__ import annotations

import shlex
from typing import Any

from django import forms
from django.contrib.auth import password_validation
from django.contrib.auth.forms import AuthenticationForm

from tenants import login_throttle
from tenants.choices import Role, Scope
from tenants.errors import BerthError
from tenants.models import SLUG_RE, User


class IdemForm(forms.Form):
    """Every dashboard form carries a one-time token (see :func:`dashboard.access.once`)."""

    idem = forms.CharField(widget=forms.HiddenInput, required=False)


def add_service_error(form: forms.Form, exc: BerthError) -> None:
    """Show a service's refusal on the field it names, or on top of the form."""
    field = (exc.details or {}).get("field")
    if not field and (exc.details or {}).get("quota"):
        field = None
    message = exc.message
    if field in form.fields:
        form.add_error(field, message)
    else:
        form.add_error(None, message)


def parse_pairs(text: str, *, what: str) -> dict[str, str]:
    """``KEY=value`` lines (blank lines and ``#`` comments skipped)."""
    pairs: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise forms.ValidationError(f"line {number}: write {what} as KEY=value")
        pairs[key.strip()] = value
    return pairs


def parse_command(text: str) -> list[str] | None:
    text = text.strip()
    if not text:
        return None
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise forms.ValidationError(f"cannot split the command into words: {exc}") from None


def format_pairs(pairs: dict[str, str]) -> str:
    return "\n".join(f"{k}={v}" for k, v in pairs.items())


def format_command(argv: list[str] | None) -> str:
    return shlex.join(argv) if argv else ""


class LoginForm(AuthenticationForm):
    """Log in with an email address (usernames are the lower-cased email)."""

    username = forms.EmailField(
        label="Email", widget=forms.EmailInput(attrs={"autocomplete": "email", "autofocus": True})
    )

    def clean_username(self) -> str:
        return str(self.cleaned_data["username"]).strip().lower()

    def get_invalid_login_error(self) -> forms.ValidationError:
        """Say so when sign-ins are locked out (tenants/login_throttle.py), else the usual."""
        reason = login_throttle.locked_out(self.request, self.cleaned_data.get("username"))
        if reason is not None:
            return forms.ValidationError(reason, code="throttled")
        return super().get_invalid_login_error()


class SignupForm(IdemForm):
    email = forms.EmailField(widget=forms.EmailInput(attrs={"autocomplete": "email"}))
    password = forms.CharField(
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text="At least 8 characters, not a common password.",
    )
    organisation = forms.CharField(max_length=100, label="Organisation name")
    slug = forms.RegexField(
        regex=SLUG_RE,
        max_length=63,
        label="Organisation slug",
        help_text="Lowercase letters, digits and '-'; used in URLs and image names.",
        error_messages={
            "invalid": "Use lowercase letters, digits and '-', starting with a letter or digit."
        },
    )

    def clean_email(self) -> str:
        # Whether the email has an account is never said here (that would answer "who has
        # an account?" for anyone): the sign-up view emails that address instead.
        return str(self.cleaned_data["email"]).strip().lower()

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("password") and data.get("email"):
            candidate = User(username=data["email"], email=data["email"])
            try:
                password_validation.validate_password(data["password"], candidate)
            except forms.ValidationError as exc:
                self.add_error("password", exc)
        return data


class AcceptInvitationForm(IdemForm):
    password = forms.CharField(
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text="A new password, or your existing account's password.",
    )


class ServiceForm(IdemForm):
    name = forms.RegexField(
        regex=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        max_length=63,
        error_messages={
            "invalid": "Lowercase letters, digits and '-', starting and ending "
            "with a letter or digit."
        },
    )
    image = forms.CharField(max_length=300, help_text="e.g. busybox or registry/acme/web:1.2")
    command = forms.CharField(required=False, help_text="Shell-style words; empty: the image's.")
    replicas = forms.IntegerField(min_value=0, max_value=100, initial=1)
    cpu_millicores = forms.IntegerField(min_value=10, initial=250, label="CPU (millicores)")
    memory_mib = forms.IntegerField(min_value=6, initial=256, label="Memory (MiB)")
    env = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        label="Environment",
        help_text="KEY=value, one per line.",
    )
    secrets = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2, "autocomplete": "off"}),
        help_text="KEY=value, one per line; stored encrypted, only names are shown later.",
    )

    def clean_command(self) -> list[str] | None:
        return parse_command(self.cleaned_data["command"])

    def clean_env(self) -> dict[str, str]:
        return parse_pairs(self.cleaned_data["env"], what="variables")

    def clean_secrets(self) -> dict[str, str]:
        return parse_pairs(self.cleaned_data["secrets"], what="secrets")

    def spec(self) -> dict[str, Any]:
        d = self.cleaned_data
        data: dict[str, Any] = {
            "image": d["image"],
            "cpu_millicores": d["cpu_millicores"],
            "memory_mib": d["memory_mib"],
            "env": d["env"],
        }
        if d["command"]:
            data["command"] = d["command"]
        if d["secrets"]:
            data["secrets"] = d["secrets"]
        return data


class DeployForm(IdemForm):
    image = forms.CharField(max_length=300)
    command = forms.CharField(required=False)
    env = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        label="Environment",
        help_text="KEY=value, one per line.",
    )
    secrets = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2, "autocomplete": "off"}),
        label="Replace secrets",
        help_text="Leave empty to keep the current secrets.",
    )

    def clean_command(self) -> list[str] | None:
        return parse_command(self.cleaned_data["command"])

    def clean_env(self) -> dict[str, str]:
        return parse_pairs(self.cleaned_data["env"], what="variables")

    def clean_secrets(self) -> dict[str, str]:
        return parse_pairs(self.cleaned_data["secrets"], what="secrets")

    def spec(self) -> dict[str, Any]:
        d = self.cleaned_data
        data: dict[str, Any] = {"image": d["image"], "command": d["command"], "env": d["env"]}
        if d["secrets"]:
            data["secrets"] = d["secrets"]
        return data


class ScaleForm(IdemForm):
    replicas = forms.IntegerField(min_value=0, max_value=100)


class JobForm(IdemForm):
    name = forms.RegexField(
        regex=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        max_length=63,
        required=False,
        help_text="Optional.",
        error_messages={"invalid": "Lowercase letters, digits and '-'."},
    )
    image = forms.CharField(max_length=300)
    command = forms.CharField(required=False)
    array_size = forms.IntegerField(min_value=1, max_value=10_000, initial=1)
    parallelism = forms.IntegerField(min_value=1, max_value=1000, initial=1)
    max_retries = forms.IntegerField(min_value=0, max_value=100, initial=0)
    timeout_seconds = forms.IntegerField(min_value=1, required=False, label="Timeout (s)")
    cpu_millicores = forms.IntegerField(min_value=10, initial=250, label="CPU (millicores)")
    memory_mib = forms.IntegerField(min_value=6, initial=256, label="Memory (MiB)")

    def clean_command(self) -> list[str] | None:
        return parse_command(self.cleaned_data["command"])

    def spec(self) -> dict[str, Any]:
        data = {k: v for k, v in self.cleaned_data.items() if k != "idem" and v not in (None, "")}
        return data


class InviteForm(IdemForm):
    """Offers only the roles the inviting member may hand out (only owners make owners)."""

    email = forms.EmailField()
    role = forms.ChoiceField(choices=Role.choices, initial=Role.DEVELOPER)

    def __init__(self, *args: Any, roles: list[tuple[str, str]] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if roles is not None:
            field = self.fields["role"]
            assert isinstance(field, forms.ChoiceField)
            field.choices = roles


class RoleForm(IdemForm):
    role = forms.ChoiceField(choices=Role.choices)


class MemberRemoveForm(IdemForm):
    release_seat = forms.BooleanField(required=False)


class TokenForm(IdemForm):
    name = forms.CharField(max_length=100)
    scope = forms.ChoiceField(choices=Scope.choices, initial=Scope.WRITE)
    expires_days = forms.IntegerField(
        min_value=1,
        max_value=3650,
        required=False,
        label="Expires after (days)",
        help_text="Empty: never.",
    )


class CheckoutForm(IdemForm):
    plan = forms.ChoiceField(choices=())
    seats = forms.IntegerField(min_value=1, max_value=10_000)

    def __init__(self, *args: Any, plans: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["plan"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = plans


class SeatsForm(IdemForm):
    seats = forms.IntegerField(min_value=1, max_value=10_000)


class SpendCapForm(IdemForm):
    cap_dollars = forms.DecimalField(
        min_value=0,
        max_digits=12,
        decimal_places=2,
        required=False,
        label="Monthly spend cap (USD)",
        help_text="Empty: no cap.",
    )


NAME_FIELD_ERRORS = {
    "invalid": "Lowercase letters, digits and '-', starting and ending with a letter or digit."
}


class VolumeForm(IdemForm):
    name = forms.RegexField(
        regex=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        max_length=63,
        error_messages=NAME_FIELD_ERRORS,
    )
    size_gib = forms.IntegerField(min_value=1, initial=1, label="Size (GiB)")


class NetworkForm(IdemForm):
    name = forms.RegexField(
        regex=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        max_length=63,
        error_messages=NAME_FIELD_ERRORS,
    )


class BuildForm(IdemForm):
    context = forms.FileField(
        label="Build context (tar)",
        help_text="A tar of the build directory, e.g. tar -cf ctx.tar -C ./app .",
    )
    tag = forms.CharField(max_length=255, help_text="repository[:tag], e.g. web:1.0")
    dockerfile = forms.CharField(max_length=500, initial="Dockerfile")
    build_args = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        label="Build arguments",
        help_text="NAME=value, one per line.",
    )
    target = forms.CharField(max_length=128, required=False, help_text="Optional stage name.")
    no_cache = forms.BooleanField(required=False, label="Do not use the layer cache")

    def clean_build_args(self) -> dict[str, str]:
        return parse_pairs(self.cleaned_data["build_args"], what="build arguments")

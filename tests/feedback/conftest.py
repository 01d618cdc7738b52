"""Django set-up for the feedback tests; the whole folder skips where Django is not installed."""
import os
import shutil
import tempfile

import pytest

try:
    import django
except ImportError:
    django = None

if django is not None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "palm_rlhf.feedback.settings")
    os.environ.setdefault("PALM_RLHF_FEEDBACK_SECRET_KEY", "tests-only-secret")
    # the tests use Django's test databases; this keeps any stray file out of the working tree
    os.environ.setdefault("PALM_RLHF_FEEDBACK_DIR", tempfile.mkdtemp(prefix="feedback-tests-"))
    # Playwright's sync API leaves an asyncio loop running in the test thread; without this every
    # ORM call in a browser test raises SynchronousOnlyOperation
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    django.setup()


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives headless Chromium (needs /usr/bin/chromium + playwright)")
    config.addinivalue_line("markers", "slow: takes tens of seconds; run with -m slow")


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """Debian's Chromium instead of a downloaded browser, with no DNS lookups beyond loopback."""
    return {
        **browser_type_launch_args,
        "executable_path": shutil.which("chromium") or "/usr/bin/chromium",
        "args": ["--disable-gpu", "--disable-quic",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1"],
    }


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """MD5 in tests: the real hasher is slow on purpose (0.5 s a password), which no test here measures."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def make_items():
    """Prompts with `responses` each: every response a rating item, every pair a comparison item."""
    from palm_rlhf.feedback.tasks import add_responses

    def make(prompts=2, responses=3, overlap=1, num_bins=5):
        for p in range(prompts):
            add_responses(f"prompt {p}", [f"response {p}.{r}" for r in range(responses)], source="test",
                          num_bins=num_bins, overlap=overlap)

    return make


@pytest.fixture
def rater(django_user_model):
    def make(name, staff=False):
        return django_user_model.objects.create_user(name, password=f"{name}-password", is_staff=staff)

    return make


@pytest.fixture
def client_for(rater):
    from django.test import Client

    def make(name, staff=False, **kwargs):
        client = Client(**kwargs)
        client.force_login(rater(name, staff))
        return client

    return make

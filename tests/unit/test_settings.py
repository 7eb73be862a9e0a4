"""Settings: defaults, one-line errors naming the variable, cross-field checks, the reference."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

import pytest

from outbox_tasks.errors import ConfigurationError
from outbox_tasks.logs import JsonFormatter
from outbox_tasks.redaction import redact_text, redact_url
from outbox_tasks.settings import Settings, describe, env_var

# (env var, bad value, a phrase of what is expected)
BAD_VALUES: list[tuple[str, str, str]] = [
    ("OUTBOX_PARTITIONS", "zero", "an integer from 1 to 1024"),
    ("OUTBOX_PARTITIONS", "0", "an integer from 1 to 1024"),
    ("OUTBOX_PARTITIONS", "2000", "an integer from 1 to 1024"),
    ("OUTBOX_PARTITIONS", "1.5", "an integer from 1 to 1024"),
    ("OUTBOX_BATCH_SIZE", "-1", "an integer from 1 to 10000"),
    ("OUTBOX_MAX_RETRIES", "lots", "an integer from 0 to 1000"),
    ("OUTBOX_METRICS_PORT", "70000", "an integer from 0 to 65535"),
    ("OUTBOX_DATABASE_URL", "mysql://x", "a URL starting with postgresql://"),
    ("OUTBOX_DATABASE_URL", "", "a URL starting with postgresql://"),
    ("OUTBOX_DATABASE_URL", "127.0.0.1:5432/outbox", "a URL starting with postgresql://"),
    ("OUTBOX_BROKER_URL", "redis://h:port/0", "a URL starting with redis://"),
    ("OUTBOX_BROKER_URL", "", "a URL starting with redis://"),
    ("OUTBOX_BROKER_URL", "kafka://h:9092", "a URL starting with redis://"),
    ("OUTBOX_PUBLISH_URL", "http://h", "a URL starting with redis://"),
    ("OUTBOX_POLL_INTERVAL_SECONDS", "-1", "a number of seconds > 0"),
    ("OUTBOX_POLL_INTERVAL_SECONDS", "0", "a number of seconds > 0"),
    ("OUTBOX_POLL_INTERVAL_SECONDS", "nan", "a number of seconds > 0"),
    ("OUTBOX_POLL_INTERVAL_SECONDS", "inf", "a number of seconds > 0"),
    ("OUTBOX_POLL_INTERVAL_SECONDS", "1s", "a number of seconds > 0"),
    ("OUTBOX_LEASE_SECONDS", "-30", "a number of seconds > 0"),
    ("OUTBOX_WAKEUP_DEBOUNCE_SECONDS", "-0.001", "a number of seconds >= 0"),
    ("OUTBOX_CLEANUP_MODE", "purge", "one of delete, retain, archive"),
    ("OUTBOX_WAKEUP_ENABLED", "maybe", "one of true/false"),
    ("OUTBOX_EVENT_TYPE_POLICIES", "OrderViewed=drop", "EventType=park|skip"),
    ("OUTBOX_EVENT_TYPE_POLICIES", "OrderViewed", "EventType=park|skip"),
    ("OUTBOX_EVENT_TYPE_POLICIES", "=skip", "EventType=park|skip"),
    ("OUTBOX_EXCHANGE", "", "a non-empty name"),
    ("OUTBOX_EXCHANGE", "outbox events", "a non-empty name"),
    ("OUTBOX_APPLICATION_NAME", "relay\nworker", "a non-empty name"),
    ("OUTBOX_DATABASE_CONNECT_TIMEOUT_SECONDS", "1", "2 or more"),
    ("OUTBOX_DATABASE_DEADLINE_GRACE_SECONDS", "0", "a number of seconds > 0"),
    ("OUTBOX_TCP_USER_TIMEOUT_SECONDS", "-1", "a number of seconds >= 0"),
    ("OUTBOX_WAKEUP_DATABASE_URL", "redis://h", "a URL starting with postgresql://"),
    ("OUTBOX_WAKEUP_PROBE_INTERVAL_SECONDS", "0", "a number of seconds > 0"),
]


def _case_id(case: tuple[str, str, object]) -> str:
    var, value, _ = case
    return f"{var.removeprefix('OUTBOX_').lower()}={value or '<empty>'}"


def test_defaults_load_from_an_empty_environment() -> None:
    settings = Settings.from_env({})

    assert settings == Settings()
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/outbox"
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.publish_url is None
    assert settings.exchange == "outbox.events"
    assert settings.dead_letter_exchange == "outbox.dead"
    assert settings.partitions == 8
    assert settings.batch_size == 500
    assert settings.max_retries == 5
    assert settings.cleanup_mode == "retain"
    assert settings.retention_seconds == 7 * 24 * 3600
    assert settings.wakeup_enabled is True
    assert settings.event_type_policies == {}


def test_the_process_environment_is_read_when_no_mapping_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OUTBOX_PARTITIONS", "16")

    assert Settings.from_env().partitions == 16


GOOD_VALUES: list[tuple[str, str, object]] = [
    ("OUTBOX_PARTITIONS", " 16 ", 16),
    ("OUTBOX_PARTITIONS", "1024", 1024),
    ("OUTBOX_MAX_RETRIES", "0", 0),
    ("OUTBOX_POLL_INTERVAL_SECONDS", "0.25", 0.25),
    ("OUTBOX_WAKEUP_DEBOUNCE_SECONDS", "0", 0.0),
    ("OUTBOX_WAKEUP_ENABLED", "off", False),
    ("OUTBOX_WAKEUP_ENABLED", "YES", True),
    ("OUTBOX_CLEANUP_MODE", "Delete", "delete"),
    ("OUTBOX_DATABASE_URL", "postgres://u@db/outbox", "postgres://u@db/outbox"),
    ("OUTBOX_BROKER_URL", "amqp://guest:guest@mq:5672//", "amqp://guest:guest@mq:5672//"),
    ("OUTBOX_PUBLISH_URL", "", None),
    (
        "OUTBOX_EVENT_TYPE_POLICIES",
        "OrderViewed=skip, PriceChanged=park,",
        {"OrderViewed": "skip", "PriceChanged": "park"},
    ),
]


@pytest.mark.parametrize(
    ("var", "raw", "expected"), GOOD_VALUES, ids=[_case_id(c) for c in GOOD_VALUES]
)
def test_a_good_value_is_parsed_into_its_type(var: str, raw: str, expected: object) -> None:
    settings = Settings.from_env({var: raw})

    assert getattr(settings, var.removeprefix("OUTBOX_").lower()) == expected


@pytest.mark.parametrize(
    ("var", "raw", "expected"), BAD_VALUES, ids=[_case_id(c) for c in BAD_VALUES]
)
def test_a_bad_value_is_refused_with_one_line_naming_variable_value_and_expectation(
    var: str, raw: str, expected: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({var: raw})

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{var}=")
    assert repr(raw) in message
    assert "expected" in message
    assert expected in message
    assert caught.value.__cause__ is None  # the parser's traceback is noise for an operator


def test_the_first_bad_variable_is_the_one_named() -> None:
    with pytest.raises(ConfigurationError, match="OUTBOX_BROKER_URL"):
        Settings.from_env({"OUTBOX_BROKER_URL": "nope", "OUTBOX_CLEANUP_MODE": "purge"})


@pytest.mark.parametrize(
    ("env", "names"),
    [
        pytest.param(
            {"OUTBOX_BACKOFF_BASE_SECONDS": "10", "OUTBOX_BACKOFF_MAX_SECONDS": "5"},
            ("OUTBOX_BACKOFF_MAX_SECONDS", "OUTBOX_BACKOFF_BASE_SECONDS"),
            id="backoff-max-below-base",
        ),
        pytest.param(
            {"OUTBOX_LEASE_SECONDS": "5", "OUTBOX_PUBLISH_TASK_SECONDS": "5"},
            ("OUTBOX_PUBLISH_TASK_SECONDS", "OUTBOX_LEASE_SECONDS"),
            id="publish-task-equal-to-lease",
        ),
        pytest.param(
            {"OUTBOX_LEASE_SECONDS": "3", "OUTBOX_PUBLISH_TASK_SECONDS": "4"},
            ("OUTBOX_PUBLISH_TASK_SECONDS", "OUTBOX_LEASE_SECONDS"),
            id="publish-task-longer-than-lease",
        ),
        pytest.param(
            {"OUTBOX_BACKOFF_BASE_SECONDS": "600", "OUTBOX_BACKOFF_MAX_SECONDS": "300"},
            ("OUTBOX_BACKOFF_MAX_SECONDS", "OUTBOX_BACKOFF_BASE_SECONDS"),
            id="explicit-backoff-max-below-base",
        ),
        pytest.param(
            {"OUTBOX_CLEANUP_MODE": "archive"},
            ("OUTBOX_ARCHIVE_URL", "OUTBOX_CLEANUP_MODE"),
            id="archive-without-archive-url",
        ),
        pytest.param(
            {"OUTBOX_CLEANUP_MODE": "archive", "OUTBOX_ARCHIVE_URL": "   "},
            ("OUTBOX_ARCHIVE_URL", "OUTBOX_CLEANUP_MODE"),
            id="archive-with-blank-archive-url",
        ),
    ],
)
def test_settings_that_contradict_each_other_are_refused_naming_both(
    env: dict[str, str], names: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env(env)

    message = str(caught.value)
    assert "\n" not in message
    assert "expected" in message
    for name in names:
        assert name in message


def test_consistent_cross_field_values_are_accepted() -> None:
    settings = Settings.from_env(
        {
            "OUTBOX_BACKOFF_BASE_SECONDS": "2",
            "OUTBOX_BACKOFF_MAX_SECONDS": "2",
            "OUTBOX_LEASE_SECONDS": "10",
            "OUTBOX_PUBLISH_TASK_SECONDS": "9.5",
            "OUTBOX_CLEANUP_MODE": "archive",
            "OUTBOX_ARCHIVE_URL": "/var/lib/outbox/archive",
        }
    )

    assert settings.cleanup_mode == "archive"
    assert settings.archive_url == "/var/lib/outbox/archive"


def test_overrides_win_over_the_environment() -> None:
    settings = Settings.from_env({"OUTBOX_PARTITIONS": "garbage"}, partitions=4)

    assert settings.partitions == 4


def test_with_changes_validates_the_copy_again() -> None:
    settings = Settings()

    assert settings.with_changes(batch_size=10).batch_size == 10
    assert settings.batch_size == 500
    with pytest.raises(ConfigurationError, match="OUTBOX_PUBLISH_TASK_SECONDS"):
        settings.with_changes(lease_seconds=1.0, publish_task_seconds=1.0)


def test_settings_are_frozen() -> None:
    settings = Settings()

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.partitions = 2  # type: ignore[misc]


def test_every_setting_has_an_env_var_a_default_and_a_doc() -> None:
    fields = dataclasses.fields(Settings)
    rows = describe()

    assert [var for var, _, _ in rows] == [env_var(f.name) for f in fields]
    assert len({var for var, _, _ in rows}) == len(rows)
    for var, _, doc in rows:
        assert var.startswith("OUTBOX_")
        assert var == var.upper()
        assert doc.strip(), f"{var} has no description"


def test_the_documented_defaults_parse_back_to_the_defaults() -> None:
    """describe() is the configuration reference: what it shows must be a valid value."""
    environ = {var: shown for var, shown, _ in describe()}

    assert Settings.from_env(environ) == Settings()


@pytest.mark.parametrize(
    "var",
    [
        "OUTBOX_DATABASE_URL",
        "OUTBOX_BROKER_URL",
        "OUTBOX_PUBLISH_URL",
        "OUTBOX_EXCHANGE",
        "OUTBOX_PARTITIONS",
        "OUTBOX_BATCH_SIZE",
        "OUTBOX_POLL_INTERVAL_SECONDS",
        "OUTBOX_LEASE_SECONDS",
        "OUTBOX_MAX_RETRIES",
        "OUTBOX_BACKOFF_BASE_SECONDS",
        "OUTBOX_BACKOFF_MAX_SECONDS",
        "OUTBOX_CLEANUP_MODE",
        "OUTBOX_RETENTION_SECONDS",
        "OUTBOX_METRICS_PORT",
    ],
)
def test_the_contract_env_vars_exist(var: str) -> None:
    assert var in {name for name, _, _ in describe()}


@pytest.mark.parametrize(
    ("database_url", "sqlalchemy_url", "libpq_url"),
    [
        pytest.param(
            "postgresql://u:p@db:5432/outbox",
            "postgresql+psycopg://u:p@db:5432/outbox",
            "postgresql://u:p@db:5432/outbox",
            id="postgresql",
        ),
        pytest.param(
            "postgres://u@db/outbox",
            "postgresql+psycopg://u@db/outbox",
            "postgresql://u@db/outbox",
            id="postgres",
        ),
        pytest.param(
            "postgresql+psycopg://u@db/outbox?sslmode=require",
            "postgresql+psycopg://u@db/outbox?sslmode=require",
            "postgresql://u@db/outbox?sslmode=require",
            id="postgresql+psycopg",
        ),
    ],
)
def test_the_database_url_is_rewritten_for_sqlalchemy_and_libpq(
    database_url: str, sqlalchemy_url: str, libpq_url: str
) -> None:
    settings = Settings.from_env({"OUTBOX_DATABASE_URL": database_url})

    assert settings.sqlalchemy_url == sqlalchemy_url
    assert settings.libpq_url == libpq_url


def test_events_go_to_the_broker_when_no_publish_url_is_set() -> None:
    settings = Settings.from_env({"OUTBOX_BROKER_URL": "redis://broker:6379/1"})

    assert settings.effective_publish_url == "redis://broker:6379/1"


def test_events_go_to_the_publish_url_when_it_is_set() -> None:
    settings = Settings.from_env(
        {
            "OUTBOX_BROKER_URL": "redis://broker:6379/1",
            "OUTBOX_PUBLISH_URL": "amqp://guest:guest@rabbit:5672//",
        }
    )

    assert settings.broker_url == "redis://broker:6379/1"
    assert settings.effective_publish_url == "amqp://guest:guest@rabbit:5672//"


# --- defaults that follow other settings (issue 11, item 7) ----------------------------------


@pytest.mark.parametrize(
    ("lease", "publish_task"),
    [(30, 5.0), (10, 5.0), (9, 4.5), (5, 2.5), (1, 0.5), (0.2, 0.1), (3600, 5.0)],
)
def test_a_lease_set_alone_is_accepted_and_the_publish_task_default_follows_it(
    lease: float, publish_task: float
) -> None:
    settings = Settings.from_env({"OUTBOX_LEASE_SECONDS": str(lease)})

    assert settings.lease_seconds == lease
    assert settings.publish_task_seconds == publish_task
    assert settings.publish_task_seconds < settings.lease_seconds


@pytest.mark.parametrize(("base", "cap"), [(1, 300.0), (300, 300.0), (600, 600.0)])
def test_a_backoff_base_set_alone_is_accepted_and_the_cap_default_follows_it(
    base: float, cap: float
) -> None:
    settings = Settings.from_env({"OUTBOX_BACKOFF_BASE_SECONDS": str(base)})

    assert settings.backoff_max_seconds == cap


def test_an_explicit_value_of_a_derived_setting_is_kept() -> None:
    settings = Settings.from_env(
        {"OUTBOX_LEASE_SECONDS": "60", "OUTBOX_PUBLISH_TASK_SECONDS": "20"}
    )

    assert settings.publish_task_seconds == 20


def test_with_changes_lets_a_derived_default_follow_and_keeps_a_chosen_value() -> None:
    assert Settings().with_changes(lease_seconds=4).publish_task_seconds == 2
    assert (
        Settings().with_changes(lease_seconds=4).with_changes(lease_seconds=30).publish_task_seconds
        == 5
    )
    chosen = Settings(lease_seconds=60, publish_task_seconds=20)
    assert chosen.with_changes(lease_seconds=40).publish_task_seconds == 20


def test_a_worker_given_the_parents_variables_gets_the_same_settings() -> None:
    settings = Settings.from_env({"OUTBOX_LEASE_SECONDS": "5"})

    assert Settings.from_env(settings.to_env()) == settings


def test_a_derived_setting_says_what_it_follows_in_the_reference() -> None:
    docs = {var: doc for var, _, doc in describe()}

    assert "OUTBOX_LEASE_SECONDS" in docs["OUTBOX_PUBLISH_TASK_SECONDS"]
    assert "OUTBOX_BACKOFF_BASE_SECONDS" in docs["OUTBOX_BACKOFF_MAX_SECONDS"]


def test_an_exchange_name_longer_than_an_amqp_short_string_is_refused() -> None:
    assert Settings.from_env({"OUTBOX_EXCHANGE": "e" * 255}).exchange == "e" * 255
    with pytest.raises(ConfigurationError, match="OUTBOX_EXCHANGE is 256 bytes long"):
        Settings.from_env({"OUTBOX_EXCHANGE": "e" * 256})


# --- URLs never show their password (issue 11, item 8) ---------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:s3cret@db:5432/outbox", "postgresql://app:***@db:5432/outbox"),
        ("postgresql://app@db/outbox", "postgresql://app@db/outbox"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://default:p%40ss@cache:6380/1", "rediss://default:***@cache:6380/1"),
        ("amqp://guest:guest@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
        ("amqp://u:a@b@rabbit//", "amqp://u:***@rabbit//"),
        (
            "postgresql://app@db/outbox?sslmode=require&password=s3cret",
            "postgresql://app@db/outbox?sslmode=require&password=***",
        ),
        ("redis://cache:6379/0?password=s3cret", "redis://cache:6379/0?password=***"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("/var/lib/outbox/archive", "/var/lib/outbox/archive"),
    ],
)
def test_redact_url_hides_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_hides_every_url_password_in_a_message() -> None:
    message = (
        "cannot connect to redis://:pw1@cache:6379/0, then amqp://guest:pw2@rabbit//; "
        "dsn postgresql://app@db/outbox?password=pw3&sslmode=require"
    )

    redacted = redact_text(message)

    for secret in ("pw1", "pw2", "pw3"):
        assert secret not in redacted
    assert "redis://:***@cache:6379/0" in redacted
    assert "sslmode=require" in redacted


SECRET_ENV = {
    "OUTBOX_DATABASE_URL": "postgresql://app:dbsecret@db:5432/outbox",
    "OUTBOX_BROKER_URL": "redis://:brokersecret@cache:6379/0",
    "OUTBOX_PUBLISH_URL": "amqp://app:publishsecret@rabbit:5672//",
}


def test_the_printable_settings_and_the_repr_hide_every_password() -> None:
    settings = Settings.from_env(SECRET_ENV)

    printable = settings.printable()
    assert printable["database_url"] == "postgresql://app:***@db:5432/outbox"
    assert printable["broker_url"] == "redis://:***@cache:6379/0"
    assert printable["publish_url"] == "amqp://app:***@rabbit:5672//"
    assert printable["partitions"] == "8"
    for text in (repr(settings), str(settings), str(printable)):
        for secret in ("dbsecret", "brokersecret", "publishsecret"):
            assert secret not in text
    assert settings.database_url == SECRET_ENV["OUTBOX_DATABASE_URL"]  # only the display hides


def test_a_refused_url_is_named_without_its_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"OUTBOX_BROKER_URL": "redis://:brokersecret@cache:port/0"})

    assert "brokersecret" not in str(caught.value)
    assert "redis://:***@cache:port/0" in str(caught.value)


def test_json_logs_hide_url_passwords_in_the_message_the_fields_and_the_traceback() -> None:
    formatter = JsonFormatter()
    try:
        raise ConnectionError("refused: amqp://guest:tracesecret@rabbit//")
    except ConnectionError:
        record = logging.LogRecord(
            "outbox_tasks.test",
            logging.WARNING,
            __file__,
            1,
            "lost %s",
            ("redis://:msgsecret@h/0",),
            sys.exc_info(),
        )
    record.url = "postgresql://app:fieldsecret@db/outbox"
    record.nested = {"dsn": "postgresql://app:nestedsecret@db/outbox"}

    line = formatter.format(record)

    for secret in ("tracesecret", "msgsecret", "fieldsecret", "nestedsecret"):
        assert secret not in line
    assert json.loads(line)["url"] == "postgresql://app:***@db/outbox"


# --- the deployment's namespace on a shared broker (issue 11, item 4) -------------------------


@pytest.mark.parametrize(
    ("url", "namespace"),
    [
        ("postgresql://app@db/orders", "orders"),
        ("postgresql://app:pw@db:5432/billing?sslmode=require", "billing"),
        ("postgresql://db/x?dbname=sales", "sales"),
        ("postgresql://alice@db", "alice"),  # libpq: the database defaults to the user name
        ("postgres://app@db/my%20shop", "my-shop"),
    ],
)
def test_the_namespace_defaults_to_the_database_name(url: str, namespace: str) -> None:
    assert Settings.from_env({"OUTBOX_DATABASE_URL": url}).namespace == namespace


def test_the_namespace_follows_the_database_and_an_explicit_one_is_kept() -> None:
    settings = Settings.from_env({"OUTBOX_DATABASE_URL": "postgresql://app@db/orders"})

    assert settings.with_changes(database_url="postgresql://app@db/billing").namespace == (
        "billing"
    )
    chosen = Settings.from_env({"OUTBOX_NAMESPACE": "team-a"})
    assert chosen.with_changes(database_url="postgresql://app@db/billing").namespace == "team-a"


def test_the_wake_up_listener_connects_to_the_database_unless_told_otherwise() -> None:
    settings = Settings.from_env({"OUTBOX_DATABASE_URL": "postgresql+psycopg://u@db/app"})
    assert settings.wakeup_libpq_url == "postgresql://u@db/app"

    direct = settings.with_changes(wakeup_database_url="postgres://u@db-direct:5432/app")
    assert direct.wakeup_libpq_url == "postgresql://u@db-direct:5432/app"
    assert direct.libpq_url == "postgresql://u@db/app"


def test_the_stall_bound_follows_a_long_lease_and_an_explicit_one_must_exceed_the_lease() -> None:
    assert Settings.from_env({}).stall_seconds == 120
    assert Settings.from_env({"OUTBOX_LEASE_SECONDS": "60"}).stall_seconds == 240
    with pytest.raises(ConfigurationError, match=r"OUTBOX_STALL_SECONDS.*OUTBOX_LEASE_SECONDS"):
        Settings.from_env({"OUTBOX_STALL_SECONDS": "30"})

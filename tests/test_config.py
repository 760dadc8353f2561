"""Configuration precedence and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.config import ConfigError, env_var, load_settings, unknown_environment


def test_defaults_match_the_contract() -> None:
    s = load_settings(env={})
    assert (s.interval_seconds, s.window_days, s.grace_hours) == (30, 30, 6)
    assert (s.waste_min_tokens, s.waste_max_impact) == (1000, 0.5)
    assert (s.top_efficiency_tasks, s.top_waste_tasks, s.max_quests) == (15, 20, 50)
    assert s.timezone == "UTC"
    assert [r.family for r in s.providers] == ["bedrock", "codex", "minimax", "glm", "max"]


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("port: 1111\ninterval_seconds: 10\nwindow_days: 7\n")
    env = {
        "RESOURCE_EXPORTER_PORT": "2222",
        "RESOURCE_EXPORTER_INTERVAL_SECONDS": "20",
        "DATABASE_URL": "postgresql://u@h/db",
    }
    s = load_settings({"port": 3333}, env=env, config_file=f)
    assert (s.port, s.interval_seconds, s.window_days) == (3333, 20, 7)
    assert s.dsn_value() == "postgresql://u@h/db"


def test_provider_rules_from_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("providers:\n  - {family: openai, pattern: '^openai/'}\n")
    s = load_settings(env={}, config_file=f)
    assert [(r.family, r.pattern) for r in s.providers] == [("openai", "^openai/")]


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"port": 70000}, {}, "setting 'port' (from flag --port)"),
        (
            {},
            {"RESOURCE_EXPORTER_INTERVAL_SECONDS": "-1"},
            "setting 'interval_seconds' (from environment RESOURCE_EXPORTER_INTERVAL_SECONDS)",
        ),
        ({"timezone": "Mars/Olympus"}, {}, "unknown time zone 'Mars/Olympus'"),
        (
            {},
            {"RESOURCE_EXPORTER_PROVIDERS": '[{"family": "x", "pattern": "("}]'},
            "setting 'providers.0.pattern'",
        ),
        (
            {},
            {"RESOURCE_EXPORTER_PROVIDERS": '[{"family": "other", "pattern": "a"}]'},
            "implicit family",
        ),
        ({}, {"RESOURCE_EXPORTER_PROVIDERS": "not json"}, "not valid JSON"),
        ({"log_level": "LOUD"}, {}, "setting 'log_level'"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(
    flags: dict[str, object], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(flags, env=env)


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("intervall_seconds: 10\n")
    with pytest.raises(
        ConfigError,
        match=f"setting 'intervall_seconds' \\(from config file {f}\\): unknown setting",
    ):
        load_settings(env={}, config_file=f)


def test_missing_dsn_says_how_to_set_it() -> None:
    with pytest.raises(ConfigError, match="--dsn or set DATABASE_URL"):
        load_settings(env={}).dsn_value()


def test_dsn_is_secret_in_repr() -> None:
    s = load_settings({"dsn": "postgresql://u:hunter2@h/db"}, env={})
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


@pytest.mark.parametrize(
    ("yaml_text", "env", "message"),
    [
        # Below a millisecond PostgreSQL would read 0: no timeout at all.
        ("statement_timeout_seconds: 0.0004\n", {}, "setting 'statement_timeout_seconds'"),
        ("port: yes\n", {}, "setting 'port' (from config file"),  # YAML's yes is a boolean
        ("http:\n  max_connections: on\n", {}, "setting 'http.max_connections'"),
        ("waste_max_impact: .nan\n", {}, "setting 'waste_max_impact'"),
        ("", {"RESOURCE_EXPORTER_WASTE_MAX_IMPACT": "nan"}, "setting 'waste_max_impact'"),
        ("", {"RESOURCE_EXPORTER_GRACE_HOURS": "inf"}, "setting 'grace_hours'"),
    ],
)
def test_values_that_would_be_silently_wrong_are_refused(
    tmp_path: Path, yaml_text: str, env: dict[str, str], message: str
) -> None:
    f = tmp_path / "c.yml"
    f.write_text(yaml_text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(env=env, config_file=f)


def test_a_millisecond_statement_timeout_is_kept(dsn: str) -> None:
    from exporter.refresh import connect

    settings = load_settings({"dsn": dsn, "statement_timeout_seconds": 0.0012}, env={})
    with connect(settings) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1ms",)


def test_a_config_file_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_bytes(b"timezone: Europe/Z\xfcrich\n")
    with pytest.raises(ConfigError, match=r"config file .*c\.yml: not UTF-8"):
        load_settings(env={}, config_file=f)
    web = tmp_path / "web.yml"
    web.write_bytes(b"basic_auth_users:\n  \xff: x\n")
    from exporter.webconfig import load_web_config

    with pytest.raises(ConfigError, match=r"web config .*web\.yml: not UTF-8"):
        load_web_config(web)


def test_unknown_variables_with_the_prefix_are_named_with_a_guess() -> None:
    env = {
        "RESOURCE_EXPORTER_INTERVAL": "5",
        "RESOURCE_EXPORTER_PORT": "1",
        "RESOURCE_EXPORTER_ZZZ": "x",
        "OTHER": "y",
    }
    assert unknown_environment(env) == [
        "RESOURCE_EXPORTER_INTERVAL (did you mean RESOURCE_EXPORTER_INTERVAL_SECONDS?)",
        "RESOURCE_EXPORTER_ZZZ",
    ]


def test_a_settings_environment_variable_is_named_from_the_setting() -> None:
    assert env_var("reconcile_interval_seconds") == "RESOURCE_EXPORTER_RECONCILE_INTERVAL_SECONDS"
    with pytest.raises(KeyError):
        env_var("reconcile_interval")  # no such setting: a rename fails, not a silent variable

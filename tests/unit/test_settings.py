"""The settings table as the gateway and the CLI both read it: file, environment, sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from datorus_core.settings import (
    BY_NAME,
    SettingsError,
    read_conf,
    resolve_defaults,
    resolve_sources,
    shown_value,
)


def conf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "etc" / "mitm.conf"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("db", "expected"),
    [
        ("./datorus.db", "{folder}/datorus.db"),
        ("ledgers/../x.db", "{folder}/x.db"),
        ("/var/lib/datorus.db", "/var/lib/datorus.db"),
        ("postgresql://u:p@db.example/datorus", "postgresql://u:p@db.example/datorus"),
        (":memory:", ":memory:"),
    ],
)
def test_a_relative_db_is_relative_to_the_settings_file(tmp_path, monkeypatch, db, expected):
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    path = conf(tmp_path, f"db: '{db}'\n")
    assert read_conf(path)["db"] == expected.format(folder=path.parent)


def test_each_value_comes_with_its_source(tmp_path):
    values = read_conf(conf(tmp_path, "rps: 5\nburst: 9\n"))
    got = resolve_sources(values, {"DATORUS_BURST": "11"})
    assert got["rps"] == (5, "mitm.conf")
    assert got["burst"] == (11, "environment")
    assert got["max_tunnels"] == (200, "default")
    assert resolve_defaults(values, {"DATORUS_BURST": "11"})["burst"] == 11


def test_a_bad_value_in_the_file_names_the_file_and_the_setting(tmp_path):
    path = conf(tmp_path, "rps: fast\n")
    with pytest.raises(SettingsError, match=f"{path}: datorus_rps"):
        read_conf(path)


def test_a_missing_file_named_by_datorus_conf_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DATORUS_CONF", str(tmp_path / "nope.conf"))
    with pytest.raises(SettingsError, match="no such settings file"):
        read_conf()


def test_secrets_are_never_shown():
    assert shown_value(BY_NAME["stripe_api_key"], "sk_live_x") == "********"
    assert shown_value(BY_NAME["stripe_webhook_secret"], "") == ""
    assert shown_value(BY_NAME["db"], "postgresql://ops:hunter2@db/x") == (
        "postgresql://ops:********@db/x"
    )
    assert shown_value(BY_NAME["rps"], 50) == 50

"""Settings precedence: defaults < TOML file < environment < command-line flags."""

from pathlib import Path

import pytest

from config import ConfigurationError, load_settings


def test_each_source_overrides_the_one_below(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in [k for k in __import__("os").environ if k.startswith("QIE_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "site.toml"
    config.write_text('inbox = "from-file"\noutbox = "from-file"\nsettle_seconds = 5\n[defaults]\nsteps = 8\n')
    monkeypatch.setenv("QIE_OUTBOX", "from-env")
    monkeypatch.setenv("QIE_DEFAULTS__CFG", "2.5")
    settings = load_settings(config, settle_seconds=1.5)
    assert settings.inbox == tmp_path / "from-file"
    assert settings.outbox == tmp_path / "from-env"
    assert settings.settle_seconds == 1.5
    assert (settings.defaults.steps, settings.defaults.cfg, settings.defaults.shift) == (8, 2.5, 3.0)
    assert settings.url == f"sqlite:///{tmp_path / 'state.db'}"


def test_the_default_file_in_the_working_folder_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("qie-hotfolder.toml").write_text('work = "/var/tmp/qie-work"\n')
    assert load_settings().work == Path("/var/tmp/qie-work")


@pytest.mark.parametrize("toml, words", [
    ('settle_secnds = 3\n', "settle_secnds"),
    ('engine = "tensorrt"\n', "engine"),
    ('engine = "comfyui"\n', "comfyui_path"),
    ('device = "gpu"\n', "device"),
])
def test_bad_configuration_fails_at_start_naming_the_setting(tmp_path, monkeypatch, toml, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text(toml)
    with pytest.raises(ConfigurationError, match=words):
        load_settings(tmp_path / "bad.toml")


def test_a_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigurationError, match="not found"):
        load_settings(tmp_path / "nope.toml")

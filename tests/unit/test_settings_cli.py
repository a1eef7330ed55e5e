"""Every setting is declared once (service/config.py) and reachable as a MOE_* variable and a `moe-serve serve` flag,
with the same meaning: flag > variable > default. README's configuration table names every setting."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from pydantic.fields import FieldInfo

from service.cli import build_parser, settings_from_args
from service.config import Settings
from tests.conftest import ROOT


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _sample(field: FieldInfo) -> str:
    """A valid value other than the default, as the variable's text."""
    kinds = [a for a in get_args(field.annotation) if a is not type(None)] or [field.annotation]
    kind, default = kinds[0], field.default
    if get_origin(field.annotation) is Literal:
        return next(c for c in reversed(get_args(field.annotation)) if c != default)
    if kind is bool:
        return str(not default).lower()
    if kind in (int, float):
        return str(kind(default * 2) if default else kind(3))
    if get_origin(kind) is list:
        return "alpha, beta"
    return "/srv/sample" if kind is Path else "sample"


def _args(name: str, value: str, field: FieldInfo) -> list[str]:
    if field.annotation is bool:
        return ["serve", _flag(name) if value == "true" else "--no-" + _flag(name)[2:]]
    return ["serve", _flag(name), value]


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"MOE_{name.upper()}", raising=False)


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_has_a_flag_that_means_what_its_variable_means(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch)
    field = Settings.model_fields[name]
    assert field.description, f"{name}: the description is the flag's help"
    value = _sample(field)
    from_flag = settings_from_args(build_parser().parse_args(_args(name, value, field)))
    monkeypatch.setenv(f"MOE_{name.upper()}", value)
    from_env = Settings()
    assert getattr(from_flag, name) == getattr(from_env, name) != field.default
    assert from_flag == from_env


def test_flag_over_variable_over_default(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["serve"])) == Settings()
    monkeypatch.setenv("MOE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("MOE_MODEL_PROCESS", "false")
    s = settings_from_args(parser.parse_args(["serve"]))
    assert (s.max_batch_size, s.model_process) == (16, False)
    s = settings_from_args(parser.parse_args(["serve", "--max-batch-size", "8", "--model-process"]))
    assert (s.max_batch_size, s.model_process) == (8, True)
    # The top-level --log-level (it also sets the CLI's own logging) reaches the settings too.
    assert settings_from_args(parser.parse_args(["--log-level", "debug", "serve"])).log_level == "debug"


def test_models_flag_is_parsed_by_the_settings_once() -> None:
    args = build_parser().parse_args(["serve", "--models", "a, b,,c"])
    assert args.models == "a, b,,c"  # the CLI passes the text on; the Settings validator splits it
    assert settings_from_args(args).models == ["a", "b", "c"]
    assert settings_from_args(build_parser().parse_args(["serve", "--models", '["x"]'])).models == ["x"]


def test_flag_values_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for bad in (["--port", "x"], ["--access-log", "xml"], ["--precision", "fp8"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *bad])
    with pytest.raises(ValueError, match="max_batch_size"):
        settings_from_args(parser.parse_args(["serve", "--max-batch-size", "0"]))


def test_readme_configuration_table_names_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`MOE_([A-Z_]+)`", section))
    missing = {n for n in Settings.model_fields if n.upper() not in listed}
    assert not missing, f"README's configuration table lacks {sorted(missing)}"
    unknown = {n.lower() for n in listed} - set(Settings.model_fields)
    assert not unknown, f"README's configuration table names settings that do not exist: {sorted(unknown)}"

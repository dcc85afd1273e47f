"""The settings of every process as one Markdown table, from the settings dataclasses
themselves, so docs/SETTINGS.md cannot drift from the code.

    python -m ops.settings_table            # print the table
    python -m ops.settings_table --write    # replace the table between docs/SETTINGS.md's markers
    python -m ops.settings_table --check    # exit 1 when docs/SETTINGS.md's table is stale (a test runs it)

Each row: the flag, its environment variable, the default and what it does, grouped by
where the setting is declared (settings shared by every server, by every model server, by
every domain service, then each process's own).
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

from ops.generated import cli
from shared.settings import BaseSettings, DomainSettings, ServerSettings, ServingSettings

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "SETTINGS.md"
BLOCK = "settings"  # <!-- settings:begin --> ... <!-- settings:end -->

# (heading, "module:Class") of each process's own settings, in the order `make up` starts them.
PROCESSES = [
    ("trainer (`python -m trainer serve`)", "trainer.service:TrainerSettings"),
    ("fraud service (`python -m services.fraud.main`)", "services.fraud.main:FraudSettings"),
    ("recommender service (`python -m services.recommender.main`)", "services.recommender.main:RecommenderSettings"),
    ("pricing service (`python -m services.pricing.main`)", "services.pricing.main:PricingSettings"),
]


def _load(spec: str) -> type[BaseSettings] | None:
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError:  # a service that is not written yet has no row
        return None


def _own_fields(cls: type, base: type) -> list[dataclasses.Field]:
    """Fields cls declares or re-defaults relative to base."""
    inherited = {f.name: f.default for f in dataclasses.fields(base)} if dataclasses.is_dataclass(base) else {}
    return [f for f in dataclasses.fields(cls) if f.name not in inherited or inherited[f.name] != f.default]


def _fmt_default(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v == "":
        return '""'
    return f"`{v}`"


def _rows(cls: type[BaseSettings], fields: list[dataclasses.Field]) -> list[str]:
    out = []
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        out.append(f"| `{flag}` | `{cls.env_name(f.name)}` | {_fmt_default(f.default)} | {help_text} |")
    return out


def table() -> str:
    header = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    groups: list[tuple[str, type, type]] = [
        ("every server (services and trainer)", ServerSettings, BaseSettings),
        ("every model server (services, `make serve-onnx`)", ServingSettings, ServerSettings),
        ("every domain service", DomainSettings, ServingSettings),
    ]
    for heading, spec in PROCESSES:
        cls = _load(spec)
        if cls is not None:
            base = DomainSettings if issubclass(cls, DomainSettings) else ServerSettings
            groups.append((heading, cls, base))
    lines: list[str] = []
    for heading, cls, base in groups:
        fields = _own_fields(cls, base)
        if not fields:
            continue
        lines += [f"**{heading}**", "", *header, *_rows(cls, fields), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    return cli(argv, prog="python -m ops.settings_table", description=__doc__, path=DOC, name=BLOCK, body=table)


if __name__ == "__main__":
    sys.exit(main())

"""Train the first version of each domain from its own data and publish it.

    python -m trainer bootstrap [--domains fraud,recommender,pricing] [--domain-modules ...] [--force]

Each domain's first-model training is its plug-in's `bootstrap` (trainer/plugins.py), in the
domain's own module: fraud on the real creditcard transactions (trainer/domains/fraud_bootstrap.py),
the recommender on the Ta Feng purchases (trainer/domains/recommender_bootstrap.py), pricing on
Ta Feng sales at their unit prices (trainer/domains/pricing.py bootstrap_pricing).
"""
from __future__ import annotations

import logging
from pathlib import Path

from shared.registry import ModelRegistry
from trainer.plugins import DEFAULT_DOMAIN_MODULES, Domains, load_domains

log = logging.getLogger(__name__)


def bootstrap(registry: ModelRegistry, workdir: Path, domains: list[str], force: bool = False,
              models: dict | None = None, *, plugins: Domains | None = None, **kw) -> dict:
    """Each domain's first model, in order: domain -> its bootstrap's decision entry (None when
    the registry already had a version and not force). models: domain -> the DomainModel to train
    (default: its plug-in's model with default settings). plugins: the domains known (default:
    the built-in ones)."""
    plugins = load_domains(DEFAULT_DOMAIN_MODULES) if plugins is None else plugins
    unknown = [d for d in domains if d not in plugins]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known: {list(plugins)}")
    return {d: plugins[d].bootstrap(registry, workdir, force=force, model=(models or {}).get(d), **kw)
            for d in domains}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from shared import logs

    ap = argparse.ArgumentParser(prog="python -m trainer bootstrap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain-modules", default=DEFAULT_DOMAIN_MODULES,
                    help="comma list of the modules whose domain plug-ins are known")
    ap.add_argument("--domains", default="", help="comma list of domains (default: every known one)")
    ap.add_argument("--registry-dir", default="var/registry")
    ap.add_argument("--workdir", default="var/trainer")
    ap.add_argument("--force", action="store_true", help="publish a new first version even if one exists")
    args = ap.parse_args(argv)
    logs.configure("INFO", "text")
    try:
        plugins = load_domains(args.domain_modules)
    except ValueError as e:
        ap.error(str(e))
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] or list(plugins)
    unknown = [d for d in domains if d not in plugins]
    if unknown:
        ap.error(f"unknown domain(s) {unknown}; known: {list(plugins)}")
    bootstrap(ModelRegistry(args.registry_dir), Path(args.workdir), domains, force=args.force, plugins=plugins)
    return 0

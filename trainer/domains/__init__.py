"""The built-in domains, trainer side: what each learner needs (data, network, export, metrics).

Each declares itself to the trainer in its plug-in module, `<domain>_plugin.py`
(TRAINER_DOMAIN, trainer/plugins.py), which the trainer finds by module name."""

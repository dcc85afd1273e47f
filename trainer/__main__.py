"""python -m trainer {serve,bootstrap,replay,report} ... (see each command's --help)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "serve"
    if command == "serve":
        from shared.server import run_app
        from trainer.service import TrainerSettings, make_app

        return run_app(make_app, TrainerSettings.load(argv))
    if command == "bootstrap":
        from trainer.bootstrap import main as bootstrap_main

        return bootstrap_main(argv)
    if command == "replay":
        from trainer.replay import main as replay_main

        return replay_main(argv)
    if command == "report":
        from trainer.report import main as report_main

        return report_main(argv)
    print(__doc__, file=sys.stderr)
    print(f"unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""``python -m detectors``: run one detector until SIGTERM/SIGINT.

``python -m detectors train ...`` / ``evaluate ...`` train and evaluate the anomaly model
instead (detectors/train.py; also ``killswitch train``).

Configuration comes from ``KS_*`` settings (service/config.py, docs/detector.md); the
service URL and the ``detector`` operator token, like the CLI's client commands, from
``--url``/``KS_URL`` and ``--token``/``KS_TOKEN``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from detectors.actions import DetectorAuthError
from detectors.consumer import run_detector
from service.config import Settings
from service.kernel.errors import KillSwitchError


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m detectors", description=__doc__)
    parser.add_argument(
        "--url",
        default=os.environ.get("KS_URL", "http://127.0.0.1:8080"),
        help="service URL (env KS_URL; default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("KS_TOKEN"),
        help="detector operator token, kso_... (env KS_TOKEN)",
    )
    return parser.parse_args(argv)


async def _main(settings: Settings, url: str, token: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_detector(settings, service_url=url, token=token, stop=stop)


def main(argv: list[str] | None = None) -> int:
    rest = sys.argv[1:] if argv is None else argv
    if rest and rest[0] in ("train", "evaluate"):
        from detectors.train import main as train_main

        return train_main(rest)
    args = _parse(argv)
    try:
        settings = Settings.from_env()
    except KillSwitchError as exc:
        print(f"killswitch detector: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.token:
        print("killswitch detector: no token: pass --token or set KS_TOKEN", file=sys.stderr)
        return 2
    try:
        asyncio.run(_main(settings, args.url, args.token))
    except DetectorAuthError as exc:
        print(f"killswitch detector: {exc}", file=sys.stderr)
        return 3
    except (ValueError, KillSwitchError) as exc:  # e.g. ArtifactError: a refused model
        print(f"killswitch detector: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m service.brokers``: fetch jars or run a broker in the foreground.

python -m service.brokers jars [--version 4.4.0]      # prints the libs dir
python -m service.brokers tansu [--port N]            # Ctrl-C to stop
python -m service.brokers kafka [--version V] [--port N] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from . import DEFAULT_KAFKA_VERSION, ensure_kafka_jars, start_apache_kafka, start_tansu
from ._process import BrokerStartError


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.brokers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("jars", help="resolve the Apache Kafka jars; print their directory")
    j.add_argument("--version", default=DEFAULT_KAFKA_VERSION)
    t = sub.add_parser("tansu", help="run the embedded tansu broker until Ctrl-C")
    t.add_argument("--port", type=int)
    k = sub.add_parser("kafka", help="run Apache Kafka (KRaft) until Ctrl-C")
    k.add_argument("--version", default=DEFAULT_KAFKA_VERSION)
    k.add_argument("--port", type=int)
    k.add_argument("--work-dir", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "jars":
            print(ensure_kafka_jars(args.version, progress=_say))
            return 0
        t0 = time.monotonic()
        if args.cmd == "tansu":
            broker = start_tansu(port=args.port)
        else:
            broker = start_apache_kafka(
                version=args.version, port=args.port, work_dir=args.work_dir, progress=_say
            )
    except BrokerStartError as e:
        _say(f"error: {e}")
        return 1
    _say(
        f"{broker.kind} ready on {broker.bootstrap} in {time.monotonic() - t0:.2f}s "
        f"(log {broker.log_path}); Ctrl-C to stop"
    )
    print(broker.bootstrap, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with broker:
        try:
            while not done.wait(0.5):
                if not broker.running():
                    _say(f"broker exited; see {broker.log_path}")
                    return 1
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

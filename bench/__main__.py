"""``python -m bench <name> [options]``: all, throughput, latency, growth, baseline, cleanup,
producer, consumer, scaling, cpu.

Each bench prints a markdown table to stdout (progress goes to stderr) and writes its JSON, with
versions and settings, to ``bench/results/<name>.json`` (``--output`` to change it). Run from the
repository root; the services are the ones the tests use (see README).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "all": ("bench.suite", "every figure of the performance table, with ratios, in one run"),
    "throughput": ("bench.throughput", "outbox_tasks (real celery workers + beat) vs the limit"),
    "latency": ("bench.latency", "commit-to-arrival at a fixed producer rate, wake-up on/off"),
    "growth": ("bench.growth", "batch cost with millions of published rows in the table"),
    "baseline": ("bench.baseline", "the limit alone: psycopg + redis-py / py-amqp, no Celery"),
    "cleanup": ("bench.cleanup", "cleanup of published rows vs concurrent insert latency"),
    "producer": ("bench.producer", "what the per-aggregate counter costs producers, and its size"),
    "consumer": ("bench.consumer", "ordered consumer group: 1 vs 2 processes, messages/event"),
    "cpu": ("bench.cpu", "relay CPU per message in one process (no Celery), with --profile"),
    "scaling": ("bench.scaling", "idle cost per partition and process; throughput against both"),
}


def usage() -> str:
    lines = ["usage: python -m bench <name> [options]   (<name> --help for its options)", ""]
    lines += [f"  {name:<11} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"unknown bench {name!r}\n\n{usage()}\n")
        return 2
    # Imported lazily: each bench pulls in only what it needs.
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())

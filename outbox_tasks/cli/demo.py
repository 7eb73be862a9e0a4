"""``demo``: workers, beat, Flower, a producer and a consumer, with live progress
(outbox_tasks.demo)."""

from __future__ import annotations

import click

from outbox_tasks.cli.options import settings_from_options


@click.command(
    "demo", help="run workers, beat, Flower, a producer and a consumer, with live progress"
)
@click.option(
    "--duration",
    type=float,
    default=0,
    help="seconds to produce before draining and stopping (0: until Ctrl-C)",
)
@click.option(
    "--rate",
    type=float,
    default=40,
    # The demo's single consumer process (one transaction per event, against an embedded
    # Python Redis) handles about 100 events/s; stay below so latency shows the relay.
    help="orders per second, 2 events each (default 40)",
)
@click.option("--workers", type=int, default=2, help="worker processes (default 2)")
@click.option(
    "--flower-port",
    type=int,
    default=None,
    help="Flower port (default 5555, or a free port when 5555 is taken; 0: no Flower)",
)
@click.option("--no-tty", is_flag=True, help="plain progress lines, no redraw")
def demo_command(
    duration: float, rate: float, workers: int, flower_port: int | None, no_tty: bool
) -> int:
    from outbox_tasks.demo.run import DemoOptions, run_demo

    # Every OUTBOX_* value is checked before anything starts.
    settings = settings_from_options()
    options = DemoOptions(
        duration=duration, rate=rate, workers=workers, flower_port=flower_port, no_tty=no_tty
    )
    return run_demo(settings, options)

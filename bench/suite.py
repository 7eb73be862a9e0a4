"""``python -m bench all``: every figure of the performance table in one run (issue 12).

Throughput (Redis and RabbitMQ, 1 and 2 worker processes, against the limit, alternating),
latency at 200/s and 2 000/s (wake-up on; off at the first rate) against the limit's latency,
relay CPU per 1 000 messages, the worker's resident memory, and a memory soak at a steady rate.
Each figure sits next to the limit's from the same run and their ratio. ``--quick`` makes every
part small (about 5 minutes); the full run takes about 25 minutes plus the soak.

Settings are a new installation's defaults (``OUTBOX_*`` unset: 8 partitions, batch 500,
poll 1 s, wake-up on) unless given.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench import common, latency, throughput
from bench.common import log

QUICK = {"events": 20_000, "repeats": 1, "duration": 8.0, "soak": 30.0, "latency_repeats": 1}
FULL = {"events": 100_000, "repeats": 3, "duration": 20.0, "soak": 600.0, "latency_repeats": 2}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench all",
        description="every figure of docs/performance.md's table, with ratios, in one run",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (about 5 minutes)")
    parser.add_argument("--events", type=int, default=None, help="throughput events per run")
    parser.add_argument("--aggregates", type=int, default=1000)
    parser.add_argument("--payload-bytes", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=None, help="throughput repeats")
    parser.add_argument("--workers", type=common.csv_ints, default=[1, 2])
    parser.add_argument(
        "--brokers", type=common.csv_choices(common.BROKERS), default=list(common.BROKERS)
    )
    parser.add_argument("--rates", type=common.csv_ints, default=[200, 2000], help="events/s")
    parser.add_argument("--duration", type=float, default=None, help="seconds per latency run")
    parser.add_argument("--latency-repeats", type=int, default=None)
    parser.add_argument("--latency-workers", type=int, default=2, help="-c of the latency runs")
    parser.add_argument(
        "--soak", type=float, default=None, help="seconds of the memory soak (0: skip)"
    )
    parser.add_argument("--soak-rate", type=int, default=500, help="events/s during the soak")
    parser.add_argument(
        "--outbox-tasks-from",
        default=None,
        metavar="DIR",
        help="run the workers with PYTHONPATH=DIR: a directory holding another outbox_tasks "
        "package (e.g. an older version, for before/after figures)",
    )
    parser.add_argument("--logs", type=Path, default=None, help="keep worker/beat logs here")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy every worker here")
    common.add_relay_arguments(parser)
    common.add_output_argument(parser)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # What throughput.run_matrix and latency.run_case read from ``args``.
    args.candidate = args.outbox_tasks_from
    args.producers = 0
    args.broker = "redis"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    relay = common.relay_overrides(args)
    results = common.Results("all", list(argv or []))
    results.settings = {
        "throughput": {
            "events": args.events,
            "aggregates": args.aggregates,
            "payload_bytes": args.payload_bytes,
            "repeats": args.repeats,
            "workers": args.workers,
            "brokers": args.brokers,
        },
        "latency": {
            "rates": args.rates,
            "duration": args.duration,
            "repeats": args.latency_repeats,
            "workers": args.latency_workers,
        },
        "soak": {"seconds": args.soak, "rate": args.soak_rate},
        "outbox_tasks_from": args.outbox_tasks_from,
        "relay": {**common.RELAY_DEFAULTS, **relay},
    }
    log(f"relay settings: {results.settings['relay']}")
    need_amqp = "amqp" in args.brokers
    with common.bench_env(need_amqp) as env:
        mine = "outbox_tasks_from" if args.outbox_tasks_from else "outbox_tasks"
        for r in throughput.run_matrix(env, args, relay, ["baseline", mine]):
            # The figures are outbox_tasks's, whichever package the workers imported.
            results.runs.append(
                {"bench": "throughput", **r, "system": r["system"].split("_from")[0]}
            )
        lat_args = argparse.Namespace(**{**vars(args), "workers": args.latency_workers})
        for repeat in range(args.latency_repeats):
            for i, rate in enumerate(args.rates):
                cases = [("outbox_tasks", "on"), ("baseline", "on")]
                if i == 0:
                    cases.append(("outbox_tasks", "off"))
                shift = repeat % len(cases)
                for system, mode in cases[shift:] + cases[:shift]:
                    r = latency.run_case(
                        env, lat_args, relay, system=system, mode=mode, rate=rate, repeat=repeat
                    )
                    results.runs.append({"bench": "latency", **r, "repeat": repeat})
        if args.soak > 0:
            log(f"soak: {args.soak_rate}/s for {args.soak:g} s, outbox_tasks, wake-up on")
            r = latency.run(
                env,
                broker="redis",
                rate=args.soak_rate,
                duration=args.soak,
                wakeup=True,
                procs=args.latency_workers,
                producers=max(2, args.soak_rate // 100),
                relay=relay,
                memory_every=min(10.0, max(1.0, args.soak / 30)),
                pythonpath=args.outbox_tasks_from,
                keep_logs=args.logs / "soak" if args.logs else None,
            )
            results.runs.append({"bench": "soak", **r})
    results.summary = summarize(results.runs, args)
    path = results.write(args.output, common.versions(need_amqp=need_amqp))
    print(report(results, args))
    print(f"\nJSON: {path}")
    return 0 if all(r["ok"] for r in results.runs) else 1


# --- the table ----------------------------------------------------------------------------------


def _latency_runs(runs: list[dict[str, Any]], system: str, rate: int, wakeup: bool) -> list[Any]:
    return [
        r
        for r in runs
        if r["bench"] == "latency"
        and r["system"] == system
        and r["rate"] == rate
        and r["wakeup"] == wakeup
    ]


def _med(runs: list[dict[str, Any]], key: str) -> float | None:
    return common.median([r[key] for r in runs if r.get(key) is not None])


def _latency_entry(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not runs:
        return None
    keys = ("p50_ms", "p95_ms", "p99_ms", "achieved_rate", "cpu_ms_per_1000", "db_cpu_ms_per_1000")
    entry: dict[str, Any] = {key: _med(runs, key) for key in keys}
    entry["backlog_grew"] = any(r["backlog_grew"] for r in runs)
    entry["per_repeat"] = [
        {k: r[k] for k in ("p50_ms", "p99_ms", "achieved_rate", "pending_end")} for r in runs
    ]
    return entry


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One entry per figure: outbox_tasks's, the limit's, their ratio, the target."""
    out: list[dict[str, Any]] = []
    tp = [r for r in runs if r["bench"] == "throughput"]
    for broker in args.brokers:
        for procs in args.workers:
            entry = throughput.summarize(tp, broker, procs)
            out.append({"figure": "throughput", **entry})
    for rate in args.rates:
        for wakeup in (True, False):
            mine = _latency_entry(_latency_runs(runs, "outbox_tasks", rate, wakeup))
            if mine is None:
                continue
            limit = _latency_entry(_latency_runs(runs, "baseline", rate, True)) if wakeup else None
            out.append(
                {"figure": "latency", "rate": rate, "wakeup": wakeup, "mine": mine, "limit": limit}
            )
    soak = [r for r in runs if r["bench"] == "soak"]
    if soak:
        s = soak[0]
        out.append(
            {
                "figure": "soak",
                "rate": s["rate"],
                "seconds": s["duration"],
                "achieved_rate": s["achieved_rate"],
                "start": s["memory_start_mib"],
                "end": s["memory_end_mib"],
                "p50_ms": s["p50_ms"],
                "p99_ms": s["p99_ms"],
            }
        )
    return out


def _ms(value: float | None) -> str:
    return common.fmt(value, 1)


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def _le(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def _ge(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def _both(*checks: bool | None) -> bool | None:
    return None if any(c is None for c in checks) else all(checks)


def report(results: common.Results, args: argparse.Namespace) -> str:
    rows: list[list[str]] = []
    summary = results.summary
    for e in (x for x in summary if x["figure"] == "latency"):
        m, lim = e["mine"], e["limit"]
        rate = e["rate"]
        label = f"latency at {rate:,}/s, wake-up {'on' if e['wakeup'] else 'off'}, p50/p95/p99"
        mine = (
            f"{_ms(m['p50_ms'])} / {_ms(m['p95_ms'])} / {_ms(m['p99_ms'])} ms "
            f"at {common.fmt(m['achieved_rate'])}/s"
            + (", backlog grew" if m["backlog_grew"] else "")
        )
        limit = (
            f"{_ms(lim['p50_ms'])} / {_ms(lim['p95_ms'])} / {_ms(lim['p99_ms'])} ms "
            f"at {common.fmt(lim['achieved_rate'])}/s"
            if lim
            else "-"
        )
        ratio = (
            f"p50 x{common.fmt(m['p50_ms'] / lim['p50_ms'], 1)}"
            if lim and m["p50_ms"] and lim["p50_ms"]
            else "-"
        )
        kept = m["achieved_rate"] is not None and m["achieved_rate"] >= 0.95 * rate
        if not e["wakeup"]:
            bound = results.settings["relay"]["poll_interval_seconds"] * 1000
            target = f"p99 <= poll interval + 100 ms ({bound + 100:.0f} ms)"
            met = _le(m["p99_ms"], bound + 100)
        elif rate <= 200:
            target = "p50 <= 5 ms, p99 <= 25 ms"
            met = _both(_le(m["p50_ms"], 5), _le(m["p99_ms"], 25))
        else:
            target = "p50 <= 15 ms, p99 <= 100 ms, rate kept, no growing backlog"
            met = _both(_le(m["p50_ms"], 15), _le(m["p99_ms"], 100), kept, not m["backlog_grew"])
        rows.append([label, mine, limit, ratio, target, _met(met)])
    for e in (x for x in summary if x["figure"] == "throughput"):
        target_ratio = 0.6 if e["broker"] == "redis" else 0.8
        name = "Redis" if e["broker"] == "redis" else "RabbitMQ with confirms"
        rows.append(
            [
                f"throughput, {name}, {args.events:,} events over {args.aggregates:,} "
                f"aggregates, {e['procs']} worker process(es)",
                f"{common.fmt(e['rate'])} msg/s",
                f"{common.fmt(e['baseline_rate'])} msg/s",
                f"**{common.fmt(e['ratio'], 2)}** ("
                + ", ".join(common.fmt(x, 2) for x in e["ratios"])
                + ")",
                f">= {target_ratio}",
                _met(_ge(e["ratio"], target_ratio)),
            ]
        )
        rows.append(
            [
                f"relay CPU per 1 000 messages, same runs ({name}, {e['procs']} process(es)), "
                "relay + its PostgreSQL backends",
                f"{_cpu(e['cpu_us'], e['db_cpu_us'])} ms",
                f"{_cpu(e['baseline_cpu_us'], e['baseline_db_cpu_us'])} ms",
                _ratio(e["cpu_us"], e["baseline_cpu_us"]),
                "<= 40 ms (relay)" if e["broker"] == "redis" else "-",
                _met(_le(e["cpu_us"], 40)) if e["broker"] == "redis" else "-",
            ]
        )
    for e in (x for x in summary if x["figure"] == "latency" and x["wakeup"]):
        m, lim = e["mine"], e["limit"]
        rows.append(
            [
                f"relay CPU per 1 000 messages at {e['rate']:,}/s (latency run)",
                f"{_cpu(m['cpu_ms_per_1000'], m['db_cpu_ms_per_1000'])} ms",
                f"{_cpu(lim['cpu_ms_per_1000'], lim['db_cpu_ms_per_1000'])} ms" if lim else "-",
                _ratio(m["cpu_ms_per_1000"], lim["cpu_ms_per_1000"] if lim else None),
                "<= 40 ms (relay)",
                _met(_le(m["cpu_ms_per_1000"], 40)),
            ]
        )
    redis_tp = [x for x in summary if x["figure"] == "throughput" and x["broker"] == "redis"]
    for e in redis_tp:
        mem, lim = e["memory_mib"], e["baseline_memory_mib"]
        rows.append(
            [
                f"resident memory after the Redis run, `-c {e['procs']}`: RSS (PSS), all processes",
                f"{common.fmt(mem['rss'])} ({common.fmt(mem['pss'])}) MiB",
                f"{common.fmt(lim['rss'])} ({common.fmt(lim['pss'])}) MiB",
                _ratio(mem["pss"], lim["pss"]) + " (PSS)",
                "report; cut what is not needed",
                "-",
            ]
        )
    for e in (x for x in summary if x["figure"] == "soak"):
        start, end = e["start"] or {}, e["end"] or {}
        grew = (end.get("rss") or 0) - (start.get("rss") or 0)
        rows.append(
            [
                f"memory over {e['seconds']:g} s at {e['rate']}/s "
                f"(achieved {common.fmt(e['achieved_rate'])}/s): RSS (PSS) start -> end",
                f"{common.fmt(start.get('rss'))} ({common.fmt(start.get('pss'))}) -> "
                f"{common.fmt(end.get('rss'))} ({common.fmt(end.get('pss'))}) MiB; "
                f"p50/p99 {_ms(e['p50_ms'])} / {_ms(e['p99_ms'])} ms",
                "-",
                f"{grew:+.1f} MiB RSS",
                "no growth (within 5 MiB)",
                _met(grew <= 5),
            ]
        )
    load = results.load_start, common.machine_load()
    head = (
        f"All figures, one run ({results.started}, load average {load[0]} at start, "
        f"{load[1]} at end; {'quick' if args.quick else 'full'} sizes)\n\n"
        "Relay: " + ", ".join(f"{k}={v}" for k, v in results.settings["relay"].items()) + "\n"
    )
    table = common.md_table(
        ["measure", "outbox_tasks", "the limit", "ratio", "target", "met"], rows
    )
    return head + "\n" + table


def _cpu(relay: float | None, db: float | None) -> str:
    return f"{common.fmt(relay)} + {common.fmt(db)}"


def _ratio(mine: float | None, limit: float | None) -> str:
    if not mine or not limit:
        return "-"
    return f"x{mine / limit:.1f}"

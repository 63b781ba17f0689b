"""``python -m bench``: run the benchmark suite, a quick version of it, or compare two runs."""

from __future__ import annotations

import shlex
import sys
from datetime import datetime
from pathlib import Path

import click
from pydantic import ByteSize, TypeAdapter

MiB = 1024 * 1024
GiB = 1024 * MiB


def _size(text: str) -> int:
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except Exception:  # noqa: BLE001
        raise click.BadParameter(f"{text!r} is not a size (e.g. 512MiB, 2GiB)") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers") from None


def _overrides(items: tuple[str, ...]) -> dict[str, dict[str, object]]:
    """``section.key=value`` (value parsed as TOML) → {section: {key: value}}."""
    import tomllib

    out: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise click.BadParameter(f"{item!r}: expected section.key=value, e.g. batch.linger_ms=2")
        try:
            parsed = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value.strip()
        out.setdefault(section, {})[name] = parsed
    return out


def _env(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--server-env")
        out[key] = value
    return out


def _default_out() -> Path:
    return Path("bench-results") / datetime.now().strftime("%Y%m%d-%H%M%S")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """blockferry's benchmark: a process server in its own process, agents over TLS in generator processes,
    the machine's ceiling (lz4 + AES-GCM, no I/O), the floor (every step of an acknowledged byte, in C: the
    most this design, or any, could sustain here) and borg over the same bytes, all in the same run.

    \b
      python -m bench quick                  the short suite (what `make bench` runs; < 3 minutes)
      python -m bench run [OPTIONS]          the full suite, or any part of it (--phases)
      python -m bench compare OLD NEW        the change between two runs (result.json or its directory)
    """


def _common(f):  # the options every run subcommand shares (a click decorator stack)
    options = [
        click.option("--out", type=click.Path(path_type=Path), default=None,
                     help="Output directory for result.json, report.md and the plots [bench-results/<time>]."),
        click.option("--phases", default=None,
                     help="Comma-separated subset of: ceiling,floor,borg,max,open,drain,scaling [all]."),
        click.option("--agents", type=int, default=None, help="Agents (TLS connections) in the main phases [8]."),
        click.option("--disks", "disks_per_agent", type=int, default=None, help="Disks per agent [2]."),
        click.option("--profile", "profile_text", default="random64k",
                     help="Workload: kinds random64k, db8k, seq1m (optionally KIND:SHARE by bytes) and modifiers "
                          "burst, tags; comma-separated, e.g. 'random64k:0.6,db8k:0.4,tags'.", show_default=True),
        click.option("--mix", default="35/50/15", show_default=True,
                     help="Content mix in percent: random / text-like / zeros (compressibility)."),
        click.option("--pool-size", default=None, help="Pre-generated payload pool per process [64MiB; quick 32MiB]."),
        click.option("--burst-period", type=float, default=2.0, show_default=True, help="burst: cycle length, s."),
        click.option("--burst-duty", type=float, default=0.25, show_default=True,
                     help="burst: fraction of each cycle spent writing."),
        click.option("--tag-interval", type=float, default=1.0, show_default=True,
                     help="tags: seconds between application-consistent tags per disk."),
        click.option("--zipf", type=float, default=1.1, show_default=True, help="db8k: zipf exponent of the hot set."),
        click.option("--hot-set", default="128MiB", show_default=True, help="db8k: size of the hot set per disk."),
        click.option("--disk-size", default="1GiB", show_default=True, help="Size of every simulated disk."),
        click.option("--window", default="64MiB", show_default=True,
                     help="Unacknowledged bytes per agent (the Agent's max_unacked_bytes)."),
        click.option("--gen-procs", type=int, default=0, show_default=True,
                     help="Generator processes; 0 = one per 250 agents, at most one per core."),
        click.option("--duration", type=float, default=None, help="Seconds per load phase [30; quick 8]."),
        click.option("--warmup", type=float, default=None,
                     help="Seconds excluded at the start of a phase [5; quick 2]."),
        click.option("--bytes", "budget", default=None,
                     help="Byte budget per load phase instead of a duration (e.g. 8GiB; the duration stays a cap)."),
        click.option("--open-loads", default="0.5,0.9", show_default=True,
                     help="Open-loop phases at these fractions of the measured maximum."),
        click.option("--open-rate", "open_rates", default="",
                     help="Open-loop phases at these absolute offered rates in MB/s (comma-separated)."),
        click.option("--open-duration", type=float, default=None, help="Seconds per open-loop phase [--duration]."),
        click.option("--drain-duration", type=float, default=None,
                     help="Seconds of closed-loop fill before the applier drain [min(duration, 15)]."),
        click.option("--scaling-agents", default="1,10,100,1000", show_default=True,
                     help="Agent counts of the scaling phase."),
        click.option("--scaling-duration", type=float, default=None, help="Seconds per scaling step [45; quick 8]."),
        click.option("--scaling-load", type=float, default=1.0, show_default=True,
                     help="Scaling offered load as a fraction of the measured maximum."),
        click.option("--scaling-rate", type=float, default=None, help="Scaling offered load in MB/s (overrides)."),
        click.option("--sample", "sample_size", default=None,
                     help="Bytes the ceiling, the floor and borg process (the same bytes) [1GiB; quick 256MiB]."),
        click.option("--ceiling-seconds", type=float, default=None,
                     help="Minimum ceiling (and floor) measurement time [5; quick 2]."),
        click.option("--set", "settings", multiple=True,
                     help="Server config override section.key=value (repeatable), e.g. --set batch.linger_ms=2; "
                          "reported with the results."),
        click.option("--server-env", "server_env", multiple=True,
                     help="Extra environment variable KEY=VALUE for the server process (repeatable; reported), "
                          "e.g. MALLOC_ARENA_MAX=2."),
        click.option("--catch-up-timeout", type=float, default=None,
                     help="Seconds to wait for acks and the applier after a phase [120; quick 20]."),
        click.option("--catch-up/--no-catch-up", "catch_up", default=None,
                     help="After open-loop and scaling phases, wait for the applier to catch up before the next "
                          "phase [catch-up; quick: no-catch-up]. The max phase always waits."),
        click.option("--keep-data", is_flag=True, help="Keep data directories and server logs under OUT/work."),
        click.option("--no-plots", is_flag=True, help="Skip the PNG plots."),
        click.option("--quiet", is_flag=True, help="No progress output."),
        click.option("--py-spy", "pyspy", is_flag=True,
                     help="Profile the server of every load phase with py-spy (OUT/profiles; hot spots in the "
                          "report)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


QUICK = {"duration": 8.0, "warmup": 2.0, "scaling_duration": 8.0, "sample_size": "256MiB", "ceiling_seconds": 2.0,
         "drain_duration": 4.0, "open_duration": 5.0, "catch_up_timeout": 20.0, "catch_up": False,
         "pool_size": "32MiB"}
FULL = {"duration": 30.0, "warmup": 5.0, "scaling_duration": 45.0, "sample_size": "1GiB", "ceiling_seconds": 5.0}


def _execute(preset: dict, **kw: object) -> None:
    from rich.console import Console

    from bench.profiles import ProfileError, parse_mix, parse_profile
    from bench.report import write_reports
    from bench.suite import ALL_PHASES, SuiteOptions, run_suite

    def pick(name: str, fallback: object = None) -> object:
        value = kw.get(name)
        if value is None:
            value = preset.get(name, fallback)
        return value

    phases = tuple(p.strip() for p in (kw["phases"] or ",".join(ALL_PHASES)).split(",") if p.strip())
    unknown = [p for p in phases if p not in ALL_PHASES]
    if unknown:
        raise click.BadParameter(f"unknown phase(s) {unknown}; choose from {', '.join(ALL_PHASES)}",
                                 param_hint="--phases")
    try:
        profile = parse_profile(str(kw["profile_text"]), burst_period_s=kw["burst_period"],
                                burst_duty=kw["burst_duty"], tag_interval_s=kw["tag_interval"], zipf_s=kw["zipf"],
                                hot_set_blocks=max(1, _size(str(kw["hot_set"])) // 8192),
                                mix=parse_mix(str(kw["mix"])), pool_bytes=_size(str(pick("pool_size", "64MiB"))))
    except ProfileError as exc:
        raise click.BadParameter(str(exc)) from None
    out = kw["out"] or _default_out()
    opts = SuiteOptions(
        out=Path(str(out)),
        command="python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        phases=phases,
        profile=profile,
        agents=int(pick("agents", 8)),  # type: ignore[arg-type]
        disks_per_agent=int(pick("disks_per_agent", 2)),  # type: ignore[arg-type]
        disk_size=_size(str(kw["disk_size"])),
        window=_size(str(kw["window"])),
        gen_procs=int(kw["gen_procs"] or 0),  # type: ignore[arg-type]
        duration=float(pick("duration", 30.0)),  # type: ignore[arg-type]
        warmup=float(pick("warmup", 5.0)),  # type: ignore[arg-type]
        budget_bytes=_size(str(kw["budget"])) if kw["budget"] else 0,
        open_loads=_floats(str(kw["open_loads"])),
        open_rates=_floats(str(kw["open_rates"])) if kw["open_rates"] else (),
        open_duration=pick("open_duration"),  # type: ignore[arg-type]
        drain_duration=pick("drain_duration"),  # type: ignore[arg-type]
        scaling_agents=_ints(str(kw["scaling_agents"])),
        scaling_duration=float(pick("scaling_duration", 45.0)),  # type: ignore[arg-type]
        scaling_load=float(kw["scaling_load"]),  # type: ignore[arg-type]
        scaling_rate=kw["scaling_rate"],  # type: ignore[arg-type]
        sample_bytes=_size(str(pick("sample_size", "1GiB"))),
        ceiling_seconds=float(pick("ceiling_seconds", 5.0)),  # type: ignore[arg-type]
        overrides=_overrides(tuple(kw["settings"])),  # type: ignore[arg-type]
        catch_up_timeout=float(pick("catch_up_timeout", 120.0)),  # type: ignore[arg-type]
        keep_data=bool(kw["keep_data"]),
        plots=not kw["no_plots"],
        quiet=bool(kw["quiet"]),
        pyspy=bool(kw["pyspy"]),
        catch_up_all=bool(pick("catch_up", True)),
        server_env=_env(tuple(kw["server_env"])),  # type: ignore[arg-type]
    )
    if opts.budget_bytes and kw.get("duration") is None:
        opts.duration = 600.0  # the budget decides; the duration is only a cap
    result = run_suite(opts)
    files = write_reports(result, opts.out, plots=opts.plots)
    console = Console(stderr=True)
    if not opts.quiet:
        console.print(files["markdown"].read_text().split("## Ceiling")[0])
    console.print(f"results: {files['json']}  report: {files['markdown']}")


@main.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@_common
def run(**kw: object) -> None:
    """The benchmark suite (all phases by default; 7–9 minutes on 2 cores with the defaults)."""
    _execute(FULL, **kw)


@main.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@_common
def quick(**kw: object) -> None:
    """The short suite for `make bench`: every phase, short durations, 256 MiB sample (< 3 minutes)."""
    _execute(QUICK, **kw)


@main.command()
@click.option("--records", default=3, show_default=True, help="Records per commit.")
@click.option("--record-size", "record_size", default="64KiB", show_default=True, help="Payload bytes per record.")
@click.option("--commits", default=400, show_default=True, help="Commits per measurement.")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the log goes (a temporary directory under it) [the system's temporary directory].")
def commit(records: int, record_size: str, commits: int, directory: Path | None) -> None:
    """The write-ahead log's commit latency, alone and beside a busy Python thread (the event loop)."""
    from bench.commit import measure_commit

    result = measure_commit(records, _size(record_size), commits, directory)
    for label in ("alone", "beside_busy_thread"):
        click.echo(f"{label:>20}: p50 {result[label]['p50_ms']:7.2f} ms   p99 {result[label]['p99_ms']:7.2f} ms")
    click.echo(f"{result['switch_intervals_per_commit']:.1f} GIL switch intervals "
               f"({result['switch_interval_ms']:.0f} ms) per commit beside the busy thread (p50)")


@main.command("group-commit")
@click.option("--disks", default=1000, show_default=True, help="Seed disks the groups go to in turn.")
@click.option("--groups", default=4000, show_default=True, help="Apply groups per measurement.")
@click.option("--writes", default=6, show_default=True, help="Random 64 KiB writes per group (6: one ~400 KB blob).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the seed volumes go (a temporary directory under it) [the system's temporary directory].")
def group_commit(disks: int, groups: int, writes: int, directory: Path | None) -> None:
    """The applier's commit of one apply group on local seed volumes: machine CPU per group, whole and by part."""
    from bench.groupcommit import measure_group_commit

    result = measure_group_commit(disks, groups, writes, directory)
    for label, ms in result["ms_per_group"].items():
        click.echo(f"{label:>40}: {ms:6.3f} ms of machine CPU per group")


@main.command()
@click.argument("old", type=click.Path(exists=True, path_type=Path))
@click.argument("new", type=click.Path(exists=True, path_type=Path))
def compare(old: Path, new: Path) -> None:
    """Show the change between two runs (result.json files or their directories)."""
    from bench.compare import print_comparison

    print_comparison(old, new)


if __name__ == "__main__":
    main()

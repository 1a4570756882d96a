"""Command line: ``linjax tour [--only NAME ...] [--out DIR] [--quick] [--list]``.

``linjax tour`` runs every registered tour section (see :mod:`linjax._tour`) end to end on the
embedded data, shows progress, writes ``DIR/summary.md`` with the PNG figures next to it, and
prints the headline numbers. The exit code is 0 when every section succeeded, 1 when one raised
(the summary is still written, with the traceback), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from linjax import __version__, _tour

__all__ = ["main"]

_INSTALL_HINT = 'pip install -e ".[examples]"'
_DEFAULT_OUT = Path("tour-report")


@dataclasses.dataclass
class _Result:
    section: _tour.Section
    ctx: _tour.TourContext
    elapsed: float
    error: str | None  # formatted traceback when the section raised


# --------------------------------------------------------------------------------------------
# Console output: rich when importable (the [examples] extra), plain timestamped lines otherwise.
# --------------------------------------------------------------------------------------------


class _PlainReporter:
    def __init__(self) -> None:
        self._t0 = time.perf_counter()

    def _elapsed(self) -> str:
        return f"[{time.perf_counter() - self._t0:7.1f}s]"

    def header(self, lines: list[str]) -> None:
        for line in lines:
            print(line, flush=True)

    @contextmanager
    def running(self, index: int, total: int, sec: _tour.Section) -> Iterator[None]:
        print(f"\n{self._elapsed()} ({index}/{total}) {sec.title} [{sec.name}]", flush=True)
        yield

    def message(self, sec: _tour.Section, text: str) -> None:
        print(f"{self._elapsed()}   {sec.name}: {text}", flush=True)

    def done(self, result: _Result) -> None:
        status = "FAILED" if result.error else "done"
        print(f"{self._elapsed()}   {result.section.name}: {status} in {result.elapsed:.1f}s")
        if result.error:
            print(result.error, file=sys.stderr, flush=True)

    def final(self, results: list[_Result], summary: Path) -> None:
        rows = [(r.section.name, h.label, h.text) for r in results for h in r.ctx.headlines]
        print("\nHeadline numbers")
        if rows:
            widths = [max(len(row[i]) for row in rows) for i in range(2)]
            for name, label, text in rows:
                print(f"  {name:<{widths[0]}}  {label:<{widths[1]}}  {text}")
        else:
            print("  (none recorded)")
        for r in results:
            if r.error:
                print(f"  {r.section.name}: FAILED (see {summary})")
        print(f"\nReport: {summary}", flush=True)

    def error(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


class _RichReporter(_PlainReporter):
    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console

        self._console = Console(highlight=False)
        self._status = None

    @staticmethod
    def _escape(text: str) -> str:
        from rich.markup import escape

        return escape(text)

    def header(self, lines: list[str]) -> None:
        self._console.rule("[bold]linjax tour")
        for line in lines:
            self._console.print(self._escape(line), soft_wrap=True)

    @contextmanager
    def running(self, index: int, total: int, sec: _tour.Section) -> Iterator[None]:
        title = self._escape(f"({index}/{total}) {sec.title} [{sec.name}]")
        self._console.rule(title, align="left")
        with self._console.status(f"{self._escape(sec.title)}...") as status:
            self._status = status
            try:
                yield
            finally:
                self._status = None

    def message(self, sec: _tour.Section, text: str) -> None:
        self._console.print(f"[dim]{self._elapsed()}[/dim] {self._escape(text)}", soft_wrap=True)
        if self._status is not None:
            self._status.update(self._escape(f"{sec.title}: {text}"))

    def done(self, result: _Result) -> None:
        name = self._escape(result.section.name)
        if result.error:
            self._console.print(f"[bold red]{name} FAILED[/] in {result.elapsed:.1f}s")
            self._console.print(self._escape(result.error), style="red")
        else:
            self._console.print(f"[green]{name} done[/] in {result.elapsed:.1f}s")

    def final(self, results: list[_Result], summary: Path) -> None:
        from rich.table import Table

        table = Table(title="Headline numbers", title_justify="left")
        table.add_column("section")
        table.add_column("headline")
        table.add_column("value", justify="right")
        for r in results:
            for h in r.ctx.headlines:
                table.add_row(*map(self._escape, (r.section.name, h.label, h.text)))
            if r.error:
                table.add_row(self._escape(r.section.name), "[bold red]FAILED[/]", "")
        self._console.print()
        self._console.print(table)
        # soft_wrap: never break a path, so it stays copyable (and greppable in CI logs).
        self._console.print(f"Report: {self._escape(str(summary))}", soft_wrap=True)

    def error(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def _make_reporter() -> _PlainReporter:
    try:
        import rich  # noqa: F401
    except ImportError:
        return _PlainReporter()
    return _RichReporter()


# --------------------------------------------------------------------------------------------
# summary.md
# --------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return str(text).replace("|", r"\|").replace("\n", " ")


def _environment() -> list[str]:
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return [
        f"linjax {__version__}, jax {jax.__version__}, Python {platform.python_version()}",
        f"backend: {jax.default_backend()} ({len(devices)} x {', '.join(kinds)})",
    ]


def _render_summary(
    results: list[_Result], *, env: list[str], started: datetime.datetime, quick: bool, argv: str
) -> str:
    lines = [
        "# linjax tour",
        "",
        f"- date: {started.isoformat(timespec='seconds')}",
        *(f"- {line}" for line in env),
        f"- mode: {'quick' if quick else 'full'} (`{argv}`)",
        "",
        "| section | status | time |",
        "| --- | --- | ---: |",
    ]
    for r in results:
        status = "**FAILED**" if r.error else "ok"
        lines.append(f"| {_cell(r.section.title)} | {status} | {r.elapsed:.1f} s |")
    total = sum(r.elapsed for r in results)
    lines += [f"| total | | {total:.1f} s |", ""]
    for r in results:
        out = r.ctx.out
        status = "**FAILED**" if r.error else "ok"
        lines += [f"## {r.section.title}", "", f"`{r.section.name}`: {status} in {r.elapsed:.1f} s"]
        lines.append("")
        if r.ctx.headlines:
            lines += ["| headline | value |", "| --- | ---: |"]
            lines += [f"| {_cell(h.label)} | {_cell(h.text)} |" for h in r.ctx.headlines]
            lines.append("")
        for note in r.ctx.notes:
            lines += [note, ""]
        for path in r.ctx.figures:
            try:
                rel = path.resolve().relative_to(out.resolve()).as_posix()
            except ValueError:  # written outside the report folder: link it absolutely
                rel = path.resolve().as_posix()
            lines += [f"![{path.stem}]({quote(rel)})", ""]
        if r.error:
            lines += ["Error:", "", "```text", r.error.rstrip(), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# linjax tour
# --------------------------------------------------------------------------------------------


def _force_agg(reporter: _PlainReporter) -> None:
    # Sections must never open windows (CI, SSH, Colab): pin the file-only backend up front.
    try:
        import matplotlib
    except ImportError:
        reporter.error(f"warning: matplotlib is not installed; plots will fail ({_INSTALL_HINT})")
        return
    matplotlib.use("Agg", force=True)


def _close_figures() -> None:
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close("all")


def _select(sections: list[_tour.Section], only: list[str] | None) -> list[_tour.Section] | str:
    """The sections to run, or an error message naming the valid names."""
    if not only:
        return sections
    wanted = {name for item in only for name in item.split(",") if name}
    valid = [s.name for s in sections]
    unknown = sorted(wanted - set(valid))
    if unknown:
        names = ", ".join(valid) if valid else "(no sections are registered)"
        return f"unknown section(s) {', '.join(map(repr, unknown))}; valid names: {names}"
    return [s for s in sections if s.name in wanted]


def _run_tour(args: argparse.Namespace, argv_text: str) -> int:
    reporter = _make_reporter()
    _force_agg(reporter)  # before importing tour modules, which may import pyplot
    sections = _tour.load_sections()
    if args.list:
        for s in sections:
            print(f"{s.name:<16} {s.title}")
        return 0
    selected = _select(sections, args.only)
    if isinstance(selected, str):
        reporter.error(f"linjax tour: error: {selected}")
        return 2
    if not selected:
        reporter.error("linjax tour: error: no tour sections are registered")
        return 1

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.md"
    started = datetime.datetime.now().astimezone()
    env = _environment()
    reporter.header([*env, f"mode: {'quick' if args.quick else 'full'}; report: {out}"])

    results: list[_Result] = []

    def write_summary() -> None:
        text = _render_summary(results, env=env, started=started, quick=args.quick, argv=argv_text)
        summary.write_text(text + "\n", encoding="utf-8")

    try:
        for index, sec in enumerate(selected, start=1):
            ctx = _tour.TourContext(
                out=out,
                quick=args.quick,
                progress=lambda text, sec=sec: reporter.message(sec, text),
                name=sec.name,
            )
            with reporter.running(index, len(selected), sec):
                t0 = time.perf_counter()
                try:
                    sec.run(ctx)
                    error = None
                except Exception:  # one broken section must not hide the others' results
                    error = traceback.format_exc()
                finally:
                    _close_figures()
                elapsed = time.perf_counter() - t0
            results.append(_Result(section=sec, ctx=ctx, elapsed=elapsed, error=error))
            reporter.done(results[-1])
            write_summary()  # after each section, so a killed run still leaves a report
    except KeyboardInterrupt:
        write_summary()
        reporter.error(f"\ninterrupted; partial report in {summary}")
        return 130
    reporter.final(results, summary)
    return 1 if any(r.error for r in results) else 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linjax",
        description="linjax: pure, jit-compiled JAX transforms. Run `linjax tour` to see them.",
    )
    parser.add_argument("--version", action="version", version=f"linjax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    tour = commands.add_parser(
        "tour",
        help="run every subpackage end to end on embedded data and write a report",
        description=(
            "Run every subpackage end to end on the embedded data (scikit-learn digits and 2-D "
            "toy distributions), showing progress, then write OUT/summary.md with PNG plots and "
            "print the headline numbers. Exit code 1 if any section failed."
        ),
    )
    tour.add_argument(
        "--only",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="run only these sections (repeatable; comma-separated also works)",
    )
    tour.add_argument(
        "--out",
        type=Path,
        default=_DEFAULT_OUT,
        metavar="DIR",
        help=f"report folder (default: {_DEFAULT_OUT})",
    )
    tour.add_argument(
        "--quick", action="store_true", help="small sizes and few steps (smoke test, CI)"
    )
    tour.add_argument("--list", action="store_true", help="list the sections and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``linjax`` console script and ``python -m linjax``.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 1 if a tour section failed, 2 on usage errors.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and argparse usage errors
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    if args.command == "tour":
        return _run_tour(args, " ".join(["linjax", *argv]))
    parser.print_help()
    return 2

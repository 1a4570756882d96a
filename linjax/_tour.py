"""Plugin registry for ``linjax tour``.

Each subpackage may ship a ``tour`` module (``linjax/<sub>/tour.py``) that registers one or more
sections with :func:`section`. ``linjax tour`` (see :mod:`linjax.cli`) imports those modules with
:func:`load_sections` and runs the sections in ``order``, passing each a :class:`TourContext`
through which it reports progress, saves figures and records headline numbers::

    from linjax._tour import TourContext, section

    @section("lintools", title="Matrix-free linear algebra", order=10)
    def run(ctx: TourContext) -> None:
        ctx.progress("solving with CG")
        ...
        ctx.headline("CG iterations", int(result.num_steps))
        ctx.savefig(fig, "lintools_cg.png")
        ctx.markdown("CG converges in far fewer steps than the dimension.")

This module is imported by the tour modules at import time, so it must stay light: it imports
neither matplotlib nor rich (matplotlib is only imported inside :meth:`TourContext.savefig`).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "TOUR_SUBPACKAGES",
    "Headline",
    "Section",
    "TourContext",
    "load_sections",
    "registered_sections",
    "section",
]

#: Subpackages whose ``tour`` module :func:`load_sections` imports, when it exists.
TOUR_SUBPACKAGES: tuple[str, ...] = (
    "lintools",
    "curvature",
    "verify",
    "generative",
    "kernels_pallas",
)

_DPI = 120


@dataclasses.dataclass(frozen=True)
class Section:
    """One registered part of the tour.

    Attributes:
        name: short identifier used by ``linjax tour --only NAME`` (e.g. ``"curvature"``).
        title: human-readable heading for the console and ``summary.md``.
        order: sections run in increasing ``order`` (ties broken by ``name``).
        run: ``run(ctx: TourContext) -> None``; raises to signal failure.
    """

    name: str
    title: str
    order: int
    run: Callable[[TourContext], None]


@dataclasses.dataclass(frozen=True)
class Headline:
    """A headline number recorded by :meth:`TourContext.headline`.

    Attributes:
        label: what the number is (e.g. ``"test accuracy"``).
        value: the value as given, converted to a Python scalar where it was a 0-d array.
        text: the value formatted for display.
    """

    label: str
    value: Any
    text: str


def _print_progress(message: str) -> None:
    print(message, flush=True)


@dataclasses.dataclass
class TourContext:
    """What a tour section receives: where to write, how big to go, and where to report.

    The CLI makes one context per section. Everything a section records (figures, headline
    numbers, markdown) ends up in that section's part of ``summary.md``.

    Attributes:
        out: the report folder; figures are written here.
        quick: if ``True``, use small problem sizes and few steps (smoke tests, CI).
        progress: ``progress(message)`` shows a progress message; set by the CLI (defaults to
            ``print``).
        name: name of the section this context belongs to (empty outside the CLI).
        figures: paths saved by :meth:`savefig`, in order.
        headlines: numbers recorded by :meth:`headline`, in order.
        notes: markdown blocks recorded by :meth:`markdown`, in order.
    """

    out: Path
    quick: bool = False
    progress: Callable[[str], None] = _print_progress
    name: str = ""
    figures: list[Path] = dataclasses.field(default_factory=list)
    headlines: list[Headline] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    def savefig(self, fig: Any, filename: str) -> Path:
        """Save a matplotlib figure as a PNG under :attr:`out`, close it, and record it.

        Args:
            fig: a ``matplotlib.figure.Figure``.
            filename: file name relative to :attr:`out`; ``.png`` is appended when it has no
                suffix. Prefix it with the section name to avoid clashes between sections.

        Returns:
            The path written.

        Raises:
            ValueError: if ``filename`` is absolute or climbs out of :attr:`out` with ``..``.
        """
        rel = Path(filename)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"{filename=} must be a relative path inside the report folder")
        if not rel.suffix:
            rel = rel.with_suffix(".png")
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=_DPI, bbox_inches="tight")
        # Only pyplot keeps figures alive; a bare `Figure()` needs no closing, and importing
        # pyplot here would pick a backend as a side effect.
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            plt.close(fig)
        self.figures.append(path)
        return path

    def headline(self, label: str, value: Any, *, fmt: str | None = None) -> None:
        """Record a headline number for ``summary.md`` and the console's final table.

        Args:
            label: what the number is, e.g. ``"CG relative residual"``.
            value: a Python number, a 0-d (or size-1) array, or a string.
            fmt: a format spec for ``format(value, fmt)``, e.g. ``".2%"`` or ``".3e"``. By
                default floats use ``".4g"``, everything else ``str``.
        """
        value = _to_python(value)
        if fmt is not None:
            text = format(value, fmt)
        elif isinstance(value, float):
            text = format(value, ".4g")
        else:
            text = str(value)
        self.headlines.append(Headline(label=label, value=value, text=text))
        self.progress(f"{label}: {text}")

    def markdown(self, text: str) -> None:
        """Append free markdown to this section's part of ``summary.md``.

        Args:
            text: markdown; common leading indentation is removed.
        """
        self.notes.append(textwrap.dedent(text).strip())


def _to_python(value: Any) -> Any:
    # jax/numpy scalars and size-1 arrays -> Python scalars, so `format` specs work on them.
    if hasattr(value, "item") and getattr(value, "size", None) == 1:
        return value.item()
    return value


_REGISTRY: dict[str, Section] = {}


def section(name: str, *, title: str, order: int) -> Callable[[Callable], Callable]:
    """Register ``run(ctx) -> None`` as a tour section (decorator).

    The decorated function is returned unchanged. Registering the same function again (e.g.
    after ``importlib.reload``) replaces the old entry; a different function under a name that
    is already taken is an error.

    Args:
        name: identifier for ``--only``; letters, digits, ``_`` and ``-``.
        title: heading shown in the console and in ``summary.md``.
        order: sections run in increasing order. Convention: lintools 10, curvature 20,
            verify 30, generative 40, kernels_pallas 50.

    Returns:
        The decorator.

    Raises:
        ValueError: if ``name`` is malformed or already taken by another function.
    """
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"{name=} must be non-empty and use only letters, digits, '_' or '-'")
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"{order=} must be an int")

    def register(run: Callable) -> Callable:
        if not callable(run):
            raise TypeError(f"section {name!r}: {run!r} is not callable")
        old = _REGISTRY.get(name)
        if old is not None and _identity(old.run) != _identity(run):
            raise ValueError(f"tour section {name!r} is already registered by {_identity(old.run)}")
        _REGISTRY[name] = Section(name=name, title=title, order=order, run=run)
        return run

    return register


def _identity(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def registered_sections() -> list[Section]:
    """The sections registered so far, sorted by ``(order, name)``; imports nothing."""
    return sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name))


def _import_tours(module_names: Iterable[str]) -> None:
    for module_name in module_names:
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only "this subpackage has no tour" is fine; a tour module whose own imports fail
            # is a bug that must surface.
            if err.name != module_name:
                raise


def load_sections() -> list[Section]:
    """Import ``linjax.<sub>.tour`` for each of :data:`TOUR_SUBPACKAGES` and return all sections.

    Subpackages without a ``tour`` module are skipped. Any other import error (including a
    ``ModuleNotFoundError`` for a dependency of a tour module) propagates.

    Returns:
        Every registered section, sorted by ``(order, name)``.
    """
    _import_tours(f"linjax.{sub}.tour" for sub in TOUR_SUBPACKAGES)
    return registered_sections()

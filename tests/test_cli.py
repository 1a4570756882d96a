"""Tests for the tour registry (linjax._tour) and the command line (linjax.cli)."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import linjax
from linjax import _tour, cli

requires_mpl = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed"
)

ROOT = Path(linjax.__file__).resolve().parents[1]


@pytest.fixture
def registry(monkeypatch):
    """Give the test a private copy of the section registry.

    The real tour modules are imported first, so nothing registered by an import during the test
    is lost afterwards, and whatever the test registers disappears with the copy.
    """
    _tour.load_sections()
    monkeypatch.setattr(_tour, "_REGISTRY", dict(_tour._REGISTRY))
    return _tour._REGISTRY


def _plot_section(name, order=-100):
    @_tour.section(name, title=f"Fake {name}", order=order)
    def run(ctx):
        import matplotlib.pyplot as plt

        ctx.progress("plotting a line")
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [0, 1, 4])
        ctx.savefig(fig, f"{name}_line")
        ctx.headline("answer", 42)
        ctx.headline("relative error", 1.234567e-7, fmt=".2e")
        ctx.headline("accuracy", 0.987654)
        ctx.markdown(
            f"""
            The *fake* section ran in **quick** mode: {ctx.quick}.
            """
        )

    return run


@requires_mpl
def test_tour_runs_selected_section(registry, tmp_path, capsys):
    _plot_section("fake_ok")
    _plot_section("fake_other", order=-99)
    out = tmp_path / "report"
    assert cli.main(["tour", "--only", "fake_ok", "--out", str(out), "--quick"]) == 0

    summary = (out / "summary.md").read_text()
    png = out / "fake_ok_line.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Fake fake_ok" in summary and "fake_other" not in summary
    assert "](fake_ok_line.png)" in summary
    assert "| answer | 42 |" in summary
    assert "| relative error | 1.23e-07 |" in summary
    assert "| accuracy | 0.9877 |" in summary
    assert "quick** mode: True" in summary
    assert "jax" in summary and "backend" in summary
    printed = capsys.readouterr().out
    for text in ("42", "1.23e-07", "0.9877", "summary.md"):
        assert text in printed


def test_tour_runs_sections_in_order(registry, tmp_path):
    calls = []
    for name, order in [("late", -5), ("early", -50)]:
        _tour.section(name, title=name, order=order)(lambda ctx, name=name: calls.append(name))
    out = tmp_path / "r"
    assert cli.main(["tour", "--only", "late", "--only", "early", "--out", str(out)]) == 0
    assert calls == ["early", "late"]
    summary = (out / "summary.md").read_text()
    assert summary.index("## early") < summary.index("## late")


@requires_mpl
def test_tour_unknown_only_name(registry, tmp_path, capsys):
    _plot_section("fake_ok")
    out = tmp_path / "never"
    assert cli.main(["tour", "--only", "fake_ok", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "fake_ok" in err
    for sec in _tour.registered_sections():
        assert sec.name in err
    assert not out.exists()


@requires_mpl
def test_tour_failing_section_still_writes_summary(registry, tmp_path, capsys):
    _plot_section("fake_ok", order=-100)

    @_tour.section("fake_broken", title="Broken", order=-101)
    def broken(ctx):
        ctx.headline("before failing", 1.5)
        raise RuntimeError("deliberate failure 1234")

    out = tmp_path / "report"
    code = cli.main(["tour", "--only", "fake_broken,fake_ok", "--out", str(out)])
    assert code == 1
    summary = (out / "summary.md").read_text()
    assert "**FAILED**" in summary
    assert "RuntimeError: deliberate failure 1234" in summary and "Traceback" in summary
    assert "| before failing | 1.5 |" in summary
    # The section after the failure still ran.
    assert "| answer | 42 |" in summary and (out / "fake_ok_line.png").is_file()
    captured = capsys.readouterr()
    assert "deliberate failure 1234" in captured.out + captured.err


@requires_mpl
def test_tour_plain_output_without_rich(registry, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_make_reporter", cli._PlainReporter)
    _plot_section("fake_ok")
    assert cli.main(["tour", "--only", "fake_ok", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "plotting a line" in printed and "s] " in printed  # elapsed-time stamps
    assert "Headline numbers" in printed and "1.23e-07" in printed


@requires_mpl
def test_tour_list(registry, capsys):
    _plot_section("fake_ok")
    assert cli.main(["tour", "--list"]) == 0
    assert "fake_ok" in capsys.readouterr().out


def test_usage_errors_return_codes(capsys):
    assert cli.main([]) == 2
    assert cli.main(["tour", "--bogus"]) == 2
    assert cli.main(["--help"]) == 0
    assert "tour" in capsys.readouterr().out


@requires_mpl
def test_context_records(tmp_path):
    import numpy as np
    from matplotlib.figure import Figure

    messages = []
    ctx = _tour.TourContext(out=tmp_path, progress=messages.append)
    ctx.headline("array scalar", np.float32(0.5), fmt=".1%")
    ctx.headline("text", "n/a")
    ctx.markdown("  indented\n  block\n")
    fig = Figure()
    fig.add_subplot().plot([1, 2])
    path = ctx.savefig(fig, "sub/plot.png")
    assert path == tmp_path / "sub" / "plot.png" and path.is_file()
    assert ctx.figures == [path]
    assert [h.text for h in ctx.headlines] == ["50.0%", "n/a"]
    assert ctx.notes == ["indented\nblock"]
    assert messages == ["array scalar: 50.0%", "text: n/a"]
    with pytest.raises(ValueError, match="relative"):
        ctx.savefig(fig, "../escape.png")


def test_section_registration_rules(registry):
    def run(ctx):
        pass

    _tour.section("dup", title="A", order=1)(run)
    _tour.section("dup", title="A again", order=1)(run)  # same function: replaced
    assert registry["dup"].title == "A again"
    with pytest.raises(ValueError, match="already registered"):
        _tour.section("dup", title="B", order=2)(lambda ctx: None)
    with pytest.raises(ValueError, match="name="):
        _tour.section("has space", title="x", order=0)


def test_registry_fixture_does_not_leak():
    # Runs after the tests above in file order; none of their fake sections remain.
    names = {s.name for s in _tour.registered_sections()}
    assert not {n for n in names if n.startswith("fake_") or n in ("dup", "early", "late")}


def test_import_tours_skips_only_missing_tour_modules(tmp_path, monkeypatch):
    pkg = tmp_path / "linjax_fake_pkg_a"
    (pkg / "empty").mkdir(parents=True)
    (pkg / "broken").mkdir()
    for d in (pkg, pkg / "empty", pkg / "broken"):
        (d / "__init__.py").write_text("")
    (pkg / "broken" / "tour.py").write_text("import linjax_no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        _tour._import_tours(["linjax_fake_pkg_a.empty.tour"])  # no tour module: skipped
        with pytest.raises(ModuleNotFoundError) as info:
            _tour._import_tours(["linjax_fake_pkg_a.broken.tour"])
        assert info.value.name == "linjax_no_such_dependency_xyz"
    finally:
        for name in [m for m in sys.modules if m.startswith("linjax_fake_pkg_a")]:
            del sys.modules[name]


def _run_python(*args, code=None):
    # Make the checkout importable whether or not the package is installed.
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    cmd = [sys.executable, *(("-c", code) if code else args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_python_dash_m_help():
    proc = _run_python("-m", "linjax", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "tour" in proc.stdout
    proc = _run_python("-m", "linjax", "tour", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--only" in proc.stdout and "--quick" in proc.stdout and "--out" in proc.stdout


def test_tour_registry_is_light():
    code = textwrap.dedent(
        """
        import sys
        import linjax
        before = set(sys.modules)
        import linjax._tour
        new = set(sys.modules) - before
        heavy = sorted(m for m in new if m.split(".")[0] in ("matplotlib", "rich"))
        assert not heavy, heavy
        """
    )
    proc = _run_python(code=code)
    assert proc.returncode == 0, proc.stderr

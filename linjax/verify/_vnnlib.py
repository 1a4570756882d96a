r"""VNN-LIB 1.0 reader: box input constraints and linear output constraints.

A VNN-LIB file declares real variables ``X_0..X_{n-1}`` (network inputs, flattened) and
``Y_0..Y_{m-1}`` (outputs) and asserts constraints whose conjunction describes the
**unsafe** set: the network is safe iff no input in the box produces an output meeting
them. :func:`read_vnnlib` turns that into the safe property of :func:`branch_and_bound`.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from linjax.verify._box import Box

_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_VAR = re.compile(r"([XY])_(\d+)$")
_CMP = ("<=", ">=", "<", ">")


class _Error(ValueError):
    pass


def _parse(text: str, where: str) -> list:
    """S-expressions of the file (comments ``;`` to end of line removed)."""
    text = "\n".join(line.split(";", 1)[0] for line in text.splitlines())
    stack: list[list] = [[]]
    for tok in _TOKEN.findall(text):
        if tok == "(":
            stack.append([])
        elif tok == ")":
            if len(stack) == 1:
                raise _Error(f"{where}: unbalanced ')'")
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise _Error(f"{where}: unbalanced '(' ({len(stack) - 1} not closed)")
    return stack[0]


def _show(expr: Any) -> str:
    if isinstance(expr, list):
        return "(" + " ".join(_show(e) for e in expr) + ")"
    return str(expr)


class _Reader:
    def __init__(self, where: str):
        self.where = where
        self.declared: dict[str, set[int]] = {"X": set(), "Y": set()}

    def fail(self, msg: str, expr: Any = None) -> _Error:
        return _Error(f"{self.where}: {msg}" + (f" in {_show(expr)[:200]}" if expr else ""))

    def declare(self, cmd: list):
        if len(cmd) != 3 or not isinstance(cmd[1], str) or cmd[2] != "Real":
            raise self.fail("expected (declare-const NAME Real)", cmd)
        m = _VAR.match(cmd[1])
        if not m:
            raise self.fail(f"variable {cmd[1]!r} must be named X_<i> or Y_<j>", cmd)
        self.declared[m.group(1)].add(int(m.group(2)))

    def term(self, expr: Any) -> dict:
        """Linear term as ``{("X"|"Y", i): coeff, None: constant}``."""
        if isinstance(expr, str):
            m = _VAR.match(expr)
            if m:
                kind, i = m.group(1), int(m.group(2))
                if i not in self.declared[kind]:
                    raise self.fail(f"variable {expr} is used but not declared")
                return {(kind, i): 1.0}
            try:
                return {None: float(expr)}
            except ValueError:
                raise self.fail(f"unknown symbol {expr!r}") from None
        if not expr or not isinstance(expr[0], str):
            raise self.fail("malformed term", expr)
        op, args = expr[0], [self.term(a) for a in expr[1:]]
        if op == "+" and args:
            return _add(*args)
        if op == "-" and len(args) == 1:
            return _scale(args[0], -1.0)
        if op == "-" and len(args) > 1:
            return _add(args[0], *(_scale(a, -1.0) for a in args[1:]))
        if op == "*" and args:
            consts = [a for a in args if set(a) <= {None}]
            others = [a for a in args if not set(a) <= {None}]
            if len(others) > 1:
                raise self.fail("only linear terms are supported (a product of variables)", expr)
            c = float(np.prod([a.get(None, 0.0) for a in consts]))
            return _scale(others[0], c) if others else {None: c}
        if op == "/" and len(args) == 2 and set(args[1]) <= {None} and args[1].get(None):
            return _scale(args[0], 1.0 / args[1][None])
        raise self.fail(f"unsupported term operator {op!r}", expr)

    def atom(self, expr: list) -> tuple[str, dict]:
        """``(cmp a b)`` as ``(kind, t)`` with the constraint ``t <= 0``."""
        if len(expr) != 3:
            raise self.fail(f"({expr[0]} a b) takes two arguments", expr)
        a, b = self.term(expr[1]), self.term(expr[2])
        t = _add(a, _scale(b, -1.0)) if expr[0] in ("<=", "<") else _add(b, _scale(a, -1.0))
        kinds = {k[0] for k in t if k is not None and t[k] != 0}
        if kinds == {"X", "Y"}:
            raise self.fail("a constraint may not mix inputs X and outputs Y", expr)
        if not kinds:
            raise self.fail("constraint without variables", expr)
        return kinds.pop(), t

    def formula(self, expr: Any, depth: int = 0) -> list:
        """Conjunction items: ``("X"|"Y", t)`` atoms or ``("or", [[atoms], ...])``."""
        if not isinstance(expr, list) or not expr:
            raise self.fail("expected a constraint", expr)
        op = expr[0]
        if op in _CMP:
            return [self.atom(expr)]
        if op == "and":
            return [item for e in expr[1:] for item in self.formula(e, depth)]
        if op == "or":
            if depth > 0:
                raise self.fail("nested (or ...) is not supported (at most OR of ANDs)", expr)
            return [("or", [self.formula(e, depth + 1) for e in expr[1:]])]
        raise self.fail(f"unsupported operator {op!r} (allowed: and, or, <=, >=, <, >)", expr)


def _add(*terms: dict) -> dict:
    out: dict = {}
    for t in terms:
        for k, v in t.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _scale(t: dict, c: float) -> dict:
    return {k: c * v for k, v in t.items()}


def _check_indices(rd: _Reader, kind: str) -> int:
    ids = rd.declared[kind]
    if not ids:
        raise rd.fail(f"no {kind}_i variables are declared")
    if ids != set(range(len(ids))):
        raise rd.fail(f"{kind} variables must be numbered 0..{len(ids) - 1}, got {sorted(ids)}")
    return len(ids)


def read_vnnlib(
    path: str | os.PathLike, *, return_groups: bool = False, dtype: Any = None
) -> tuple:
    r"""Read a VNN-LIB 1.0 property as ``(Box, spec, threshold)`` for :func:`branch_and_bound`.

    Supported: ``(declare-const X_i Real)`` / ``(declare-const Y_j Real)``; ``(assert
    ...)`` with ``<=``, ``>=``, ``<``, ``>`` between linear terms (numbers, variables,
    ``+``, ``-``, ``*`` by a constant, ``/`` by a constant), ``(and ...)`` and one level of
    ``(or ...)`` over output constraints (disjuncts may be ``(and ...)``); several
    top-level ``or``\ s are multiplied out. Input constraints must bound single
    variables (a box; the tightest bound wins) and may not appear inside ``or``. Strict
    and non-strict comparisons are read alike (the closure), as VNN-COMP tools do.

    **Sign convention.** The assertions describe the *unsafe* outputs. After bringing
    every output constraint to the form $a^\top Y \le b$ (``(>= p q)`` is
    $q - p \le 0$), the unsafe set is a disjunction over $d$ of conjunctions over $k$ of
    $a_{dk}^\top Y \le b_{dk}$, and the network is safe on the box iff for every $x$ and
    every disjunct $d$ some $a_{dk}^\top f(x) > b_{dk}$. Each unsafe atom thus becomes a
    spec row $c = a$ with threshold $t = b$ of the **safe** property
    ``spec @ f(x) > threshold`` (e.g. ``(assert (<= Y_0 Y_1))`` gives the row
    $Y_0 - Y_1 > 0$, and ``(assert (>= Y_0 3.99))`` the row $-Y_0 > -3.99$). When every
    disjunct is a single constraint (robustness: ``(or (>= Y_1 Y_0) (>= Y_2 Y_0) ...)``,
    or one constraint) all rows must hold, which is :func:`branch_and_bound`'s default.
    A disjunct with several constraints (ACAS Xu property 2: "$Y_0$ is maximal") makes
    its rows alternatives: pass ``return_groups=True`` to get their group ids (the
    disjunct index of each row) and hand them to ``branch_and_bound(..., groups=...)``;
    without it such a file raises a ``ValueError`` saying so.

    Args:
        path: the ``.vnnlib`` file.
        return_groups: also return the ``[S]`` integer group ids.
        dtype: dtype of the box, spec and threshold (default: JAX's default float).

    Returns:
        ``(box, spec, threshold)`` (``+ (groups,)`` with ``return_groups``): ``box`` over
        the flat input ``[n_x]``, ``spec`` ``[S, n_y]`` for the flat output, ``threshold``
        ``[S]``.

    Raises:
        ValueError: malformed or unsupported files, with the file name and the offending
            expression: unbalanced parentheses, undeclared or misnamed variables,
            non-linear terms, constraints mixing X and Y, non-box input constraints, an
            input without a finite lower and upper bound, no output constraint.
        FileNotFoundError: if ``path`` does not exist.

    Examples:
        >>> import pathlib, tempfile
        >>> from linjax import verify as vf
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "prop.vnnlib"
        >>> _ = p.write_text('''
        ... (declare-const X_0 Real) (declare-const Y_0 Real) (declare-const Y_1 Real)
        ... (assert (>= X_0 -1)) (assert (<= X_0 1))
        ... (assert (<= Y_0 Y_1))  ; unsafe: Y_0 <= Y_1
        ... ''')
        >>> box, spec, threshold = vf.read_vnnlib(p)
        >>> box.lower.tolist(), box.upper.tolist(), spec.tolist(), threshold.tolist()
        ([-1.0], [1.0], [[1.0, -1.0]], [0.0])

    References:
        VNN-LIB 1.0 standard, https://www.vnnlib.org/ ; VNN-COMP rules,
        https://sites.google.com/view/vnn2024 .
    """
    where = os.fspath(path)
    with open(where, encoding="utf-8") as fh:
        text = fh.read()
    rd = _Reader(where)
    items = []
    for cmd in _parse(text, where):
        if not isinstance(cmd, list) or not cmd or not isinstance(cmd[0], str):
            raise rd.fail("expected a command like (declare-const ...) or (assert ...)", cmd)
        if cmd[0] == "declare-const":
            rd.declare(cmd)
        elif cmd[0] == "assert":
            if len(cmd) != 2:
                raise rd.fail("(assert ...) takes one formula", cmd)
            items.extend(rd.formula(cmd[1]))
        else:
            raise rd.fail(f"unsupported command {cmd[0]!r}", cmd)
    n_x, n_y = _check_indices(rd, "X"), _check_indices(rd, "Y")
    lower, upper = np.full(n_x, -np.inf), np.full(n_x, np.inf)
    common, ors = [], []
    for kind, body in items:
        if kind == "X":
            _bound_input(rd, body, lower, upper)
        elif kind == "Y":
            common.append(body)
        else:
            ors.append(_disjuncts(rd, body))
    for i in range(n_x):
        if not (np.isfinite(lower[i]) and np.isfinite(upper[i])):
            raise rd.fail(f"input X_{i} needs a finite lower and upper bound (a box)")
        if lower[i] > upper[i]:
            raise rd.fail(f"input X_{i} has an empty range [{lower[i]}, {upper[i]}]")
    disjuncts = [common + [a for part in combo for a in part] for combo in itertools.product(*ors)]
    if not any(disjuncts):
        raise rd.fail("no output (Y) constraint: the whole box would be unsafe")
    rows, thresholds, groups = [], [], []
    for d, atoms in enumerate(disjuncts):
        for t in atoms:
            a = np.zeros(n_y)
            for k, v in t.items():
                if k is not None:
                    a[k[1]] += v
            rows.append(a)
            thresholds.append(0.0 - t.get(None, 0.0))  # no -0.0
            groups.append(d)
    groups = np.asarray(groups)
    dt = jnp.asarray(0.0).dtype if dtype is None else dtype
    box = Box(jnp.asarray(lower, dt), jnp.asarray(upper, dt))
    spec, threshold = jnp.asarray(np.stack(rows), dt), jnp.asarray(thresholds, dt)
    if return_groups:
        return box, spec, threshold, jnp.asarray(groups)
    if len(np.unique(groups)) != len(groups):
        raise rd.fail(
            "the unsafe set has a disjunct with several output constraints (a conjunction), "
            "so its negated rows are alternatives; call read_vnnlib(path, return_groups=True) "
            "and pass groups= to branch_and_bound"
        )
    return box, spec, threshold


def _bound_input(rd: _Reader, t: dict, lower: np.ndarray, upper: np.ndarray):
    vars_ = [k for k in t if k is not None and t[k] != 0]
    if len(vars_) != 1:
        raise rd.fail(
            "input constraints must bound a single variable (box inputs only), got "
            + " + ".join(f"{t[k]:g}*{k[0]}_{k[1]}" for k in vars_)
        )
    (k,) = vars_
    a, c = t[k], t.get(None, 0.0)  # a x + c <= 0
    if a > 0:
        upper[k[1]] = min(upper[k[1]], -c / a)
    else:
        lower[k[1]] = max(lower[k[1]], -c / a)


def _disjuncts(rd: _Reader, parts: list) -> list[list[dict]]:
    out = []
    for part in parts:
        atoms = []
        for kind, body in part:
            if kind != "Y":
                raise rd.fail(
                    "input (X) constraints inside (or ...) (several input boxes) are not "
                    "supported; split the file into one property per box"
                )
            atoms.append(body)
        out.append(atoms)
    return out

"""The rule table: per-primitive IBP and CROWN rules, and :func:`register_rule`.

A rule sees its arguments as :class:`~linjax.verify.Box` objects (the argument depends on
the bounded input) or plain arrays (it does not: closed-over weights, literals, anything
computed from them). The interpreter (``_graph.py``) only asks for rules of equations
with at least one bounded argument; everything else is evaluated concretely.

* **IBP rule** ``ibp(*args, **params) -> Box`` (a list of boxes for primitives with
  ``multiple_results``): sound interval bounds on the output.
* **CROWN rule** ``crown(*args, out_bounds, **params)`` returning either

  - a :class:`LinearRelaxation` (elementwise, possibly broadcasting ops): linear
    functions of the arguments that sandwich the output on the argument boxes; or
  - a callable ``backward(lam) -> (lam_args, bias)``: given ``lam`` ``[S, *out_shape]``,
    coefficients ``lam_args`` (one per argument, ``None`` for constants) and ``bias``
    ``[S]`` such that ``sum(lam * out) >= sum_i sum(lam_args[i] * args[i]) + bias`` for
    every point of the argument boxes. This is the backward (CROWN) step of the
    primitive; ``lam`` is a list for primitives with several results.

  ``out_bounds`` is the best interval known for the output (from IBP on the tightest
  argument bounds). Without a CROWN rule the primitive is *concretised* in CROWN: its
  output is treated as a fresh variable ranging over ``out_bounds``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

from jax.extend.core import Primitive


class LinearRelaxation(NamedTuple):
    r"""Elementwise linear bounds $\sum_i a^L_i x_i + c^L \le y \le \sum_i a^U_i x_i + c^U$.

    Returned by a CROWN rule of an elementwise primitive (inputs broadcast to the output
    shape as in ``lax``). Slopes and offsets are arrays broadcastable to the output shape
    and must hold for every point of the argument boxes. Non-finite entries are replaced
    by the concrete output interval (slope 0), so a rule may return ``inf``/``nan`` where
    no linear bound exists.

    Attributes:
        lower_slopes: one slope per argument of the primitive (``None`` for constant
            arguments), or a bare array when exactly one argument is bounded.
        lower_offset: $c^L$.
        upper_slopes: like ``lower_slopes``, for the upper line.
        upper_offset: $c^U$.
    """

    lower_slopes: Any
    lower_offset: Any
    upper_slopes: Any
    upper_offset: Any


@dataclasses.dataclass
class Rule:
    """One row of the table.

    ``linear(bounded)`` says whether the primitive is affine in its bounded arguments
    given which arguments are bounded (a tuple of bools); affine equations are propagated
    exactly by CROWN through their VJP and need no intermediate bounds.
    """

    ibp: Callable[..., Any] | None = None
    crown: Callable[..., Any] | None = None
    linear: Callable[[tuple[bool, ...], dict], bool] | None = None


_RULES: dict[Primitive, Rule] = {}


def set_rule(
    primitive: Primitive,
    *,
    ibp: Callable | None = None,
    crown: Callable | None = None,
    linear: Callable[[tuple[bool, ...], dict], bool] | bool | None = None,
) -> None:
    """Internal registration (built-in rules): set the given fields of a row.

    ``linear=True`` means always affine in the bounded arguments.
    """
    row = _RULES.setdefault(primitive, Rule())
    if ibp is not None:
        row.ibp = ibp
    if crown is not None:
        row.crown = crown
    if linear is not None:
        row.linear = _always if linear is True else linear


def _always(bounded: tuple[bool, ...], params: dict) -> bool:
    return True


def get_rule(primitive: Primitive) -> Rule | None:
    """The rule row of ``primitive``, or ``None``."""
    return _RULES.get(primitive)


def register_rule(
    primitive: Primitive,
    *,
    ibp: Callable[..., Any] | None = None,
    crown: Callable[..., Any] | None = None,
) -> None:
    r"""Teach :func:`ibp` / :func:`crown` a new primitive, or replace a built-in rule.

    Rules receive the primitive's arguments as :class:`Box` (bounded, i.e. depending on
    the verified input) or arrays (constants), followed by the primitive's params as
    keywords:

    * ``ibp(*args, **params) -> Box``: sound interval bounds on the output (a list of
      boxes if ``primitive.multiple_results``).
    * ``crown(*args, out_bounds, **params)`` returns a :class:`LinearRelaxation`
      $\sum_i a^L_i x_i + c^L \le y \le \sum_i a^U_i x_i + c^U$ for elementwise
      primitives, or a backward function ``lam -> (lam_args, bias)`` with
      $\langle\Lambda, y\rangle \ge \sum_i \langle\Lambda_i, x_i\rangle + \text{bias}$
      for ``lam`` of shape ``[S, *out_shape]``; see the module docs of
      ``linjax/verify/_rules.py``.

    A primitive needs an IBP rule to be supported at all. Without a CROWN rule, CROWN
    treats its output as a fresh variable in its interval (sound, but it loses the
    dependence on the input). Registering a CROWN rule for a built-in affine primitive
    replaces the exact VJP propagation with the new rule. Rules are global and apply to
    calls traced after registration.

    Args:
        primitive: a ``jax.extend.core.Primitive`` (e.g. ``jax.lax.sin_p``, or your own).
        ibp: IBP rule, or ``None`` to keep the current one.
        crown: CROWN rule, or ``None`` to keep the current one.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> def sin_ibp(x, **params):  # |sin'| <= 1 and |sin| <= 1
        ...     c, r = jnp.sin(x.center), x.radius
        ...     return vf.Box(jnp.maximum(c - r, -1.0), jnp.minimum(c + r, 1.0))
        >>> vf.register_rule(jax.lax.sin_p, ibp=sin_ibp)
        >>> out = vf.ibp(jnp.sin, vf.Box(jnp.zeros(2), jnp.full(2, 0.1)))
        >>> bool(jnp.all(out.upper <= 0.1))
        True

    References:
        Xu et al. (2020), "Automatic perturbation analysis for scalable certified
        robustness and beyond" (auto_LiRPA), https://arxiv.org/abs/2002.12920.
    """
    if not isinstance(primitive, Primitive):
        raise TypeError(
            f"primitive must be a jax.extend.core.Primitive (e.g. jax.lax.sin_p), got "
            f"{type(primitive).__name__}"
        )
    if ibp is None and crown is None:
        raise ValueError("register_rule needs at least one of ibp= or crown=")
    for name, fn in (("ibp", ibp), ("crown", crown)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    old = _RULES.get(primitive, Rule())
    _RULES[primitive] = Rule(
        ibp=ibp if ibp is not None else old.ibp,
        crown=crown if crown is not None else old.crown,
        # A user CROWN rule takes over from exact VJP propagation.
        linear=None if crown is not None else old.linear,
    )


def unsupported_message(primitive: Primitive) -> str:
    """Error text for a primitive without an IBP rule."""
    return (
        f"linjax.verify has no bound rule for the primitive '{primitive.name}' (applied to "
        f"a value that depends on the bounded input). Register one with "
        f"linjax.verify.register_rule({primitive.name}_p, ibp=..., crown=...) where "
        f"{primitive.name}_p is the primitive object (e.g. jax.lax.{primitive.name}_p); "
        f"an IBP rule alone is enough for CROWN, which then concretises the output."
    )

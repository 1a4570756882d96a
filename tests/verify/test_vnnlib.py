"""read_vnnlib: parsing, the unsafe -> safe sign conversion, round trips through BaB, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import verify as vf


def _write(tmp_path, text, name="p.vnnlib"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _declare(nx, ny):
    xs = "".join(f"(declare-const X_{i} Real)\n" for i in range(nx))
    return xs + "".join(f"(declare-const Y_{j} Real)\n" for j in range(ny))


ACAS_BOX = [(0.6, 0.68), (-0.5, 0.5), (-0.5, 0.5), (0.45, 0.5), (-0.5, -0.45)]


def _acas_inputs():
    return "".join(
        f"(assert (<= X_{i} {hi}))\n(assert (>= X_{i} {lo}))\n"
        for i, (lo, hi) in enumerate(ACAS_BOX)
    )


def test_acas_property_1_single_output_constraint(tmp_path):
    text = "; ACAS Xu property 1\n" + _declare(5, 5) + _acas_inputs()
    text += "; unsafe if COC is at least 1500\n(assert (>= Y_0 3.991125645861615))\n"
    box, spec, threshold = vf.read_vnnlib(_write(tmp_path, text))
    np.testing.assert_allclose(box.lower, [lo for lo, _ in ACAS_BOX])
    np.testing.assert_allclose(box.upper, [hi for _, hi in ACAS_BOX])
    # Safe: Y_0 < 3.99..., i.e. -Y_0 > -3.99...
    np.testing.assert_allclose(spec, [[-1.0, 0, 0, 0, 0]])
    np.testing.assert_allclose(threshold, [-3.991125645861615])


def test_acas_property_2_conjunction_needs_groups(tmp_path):
    text = _declare(5, 5) + _acas_inputs()
    text += "(assert (and (>= Y_0 Y_1) (>= Y_0 Y_2) (>= Y_0 Y_3) (>= Y_0 Y_4)))\n"
    p = _write(tmp_path, text)
    with pytest.raises(ValueError, match="return_groups=True"):
        vf.read_vnnlib(p)
    box, spec, threshold, groups = vf.read_vnnlib(p, return_groups=True)
    # Safe iff some Y_k - Y_0 > 0 (Y_0 is not maximal): four alternative rows.
    expected = np.array([[-1.0, 1, 0, 0, 0], [-1, 0, 1, 0, 0], [-1, 0, 0, 1, 0], [-1, 0, 0, 0, 1]])
    np.testing.assert_allclose(spec, expected)
    np.testing.assert_allclose(threshold, 0)
    np.testing.assert_array_equal(groups, [0, 0, 0, 0])


def _robustness_text(x0, eps, label, ny):
    text = _declare(len(x0), ny)
    for i, v in enumerate(x0):
        text += f"(assert (>= X_{i} {v - eps!r}))\n(assert (<= X_{i} {v + eps!r}))\n"
    others = [j for j in range(ny) if j != label]
    text += "(assert (or\n" + "".join(f"  (and (>= Y_{j} Y_{label}))\n" for j in others) + "))\n"
    return text


def test_robustness_property(tmp_path):
    text = _robustness_text([0.1, -0.2], 0.05, 1, 3)
    box, spec, threshold = vf.read_vnnlib(_write(tmp_path, text))
    np.testing.assert_allclose(box.lower, [0.05, -0.25])
    np.testing.assert_allclose(box.upper, [0.15, -0.15])
    np.testing.assert_allclose(spec, [[-1.0, 1, 0], [0, 1, -1]])  # Y_1 - Y_j > 0
    np.testing.assert_allclose(threshold, [0.0, 0.0])


def test_linear_terms_comments_and_strict_comparisons(tmp_path):
    text = _declare(2, 3) + (
        "(assert (and (<= X_0 1) (>= X_0 (- 1)) (< X_1 (/ 1 2)) (> X_1 -0.5)))\n"
        "(assert (<= X_0 0.75)) ; the tighter upper bound wins\n"
        "(assert (<= (+ Y_0 (* 2 Y_1) (* Y_2 -1)) (- 3 Y_2 1)))  ; Y_0 + 2 Y_1 <= 2\n"
    )
    box, spec, threshold = vf.read_vnnlib(_write(tmp_path, text))
    np.testing.assert_allclose(box.lower, [-1.0, -0.5])
    np.testing.assert_allclose(box.upper, [0.75, 0.5])
    np.testing.assert_allclose(spec, [[1.0, 2.0, 0.0]])
    np.testing.assert_allclose(threshold, [2.0])


def _unsafe_by_hand(y, kind):
    """The unsafe sets of the files below, evaluated directly (independent of spec/groups)."""
    if kind == "robust":  # label 0 of 3
        return (y[1] >= y[0]) | (y[2] >= y[0])
    # "(or (and (>= Y_0 Y_1) (>= Y_0 Y_2)) (<= Y_1 -1))"
    return ((y[0] >= y[1]) & (y[0] >= y[2])) | (y[1] <= -1)


@pytest.mark.parametrize("kind", ["robust", "mixed"])
def test_sign_conversion_matches_direct_evaluation(tmp_path, kind):
    if kind == "robust":
        text = _robustness_text([0.0, 0.0], 1.0, 0, 3)
    else:
        text = _declare(2, 3) + "(assert (and (<= X_0 1) (>= X_0 -1) (<= X_1 1) (>= X_1 -1)))\n"
        text += "(assert (or (and (>= Y_0 Y_1) (>= Y_0 Y_2)) (and (<= Y_1 -1))))\n"
    _, spec, threshold, groups = vf.read_vnnlib(_write(tmp_path, text), return_groups=True)
    ys = np.asarray(jax.random.normal(jax.random.key(0), (2000, 3)))
    v = ys @ np.asarray(spec).T - np.asarray(threshold)
    g = np.asarray(groups)
    safe = np.all([np.any(v[:, g == d] > 0, axis=1) for d in np.unique(g)], axis=0)
    np.testing.assert_array_equal(safe, ~_unsafe_by_hand(ys.T, kind))


def _net():
    w1 = jnp.array([[1.0, -0.5], [0.3, 1.2], [-0.7, 0.4], [0.5, 0.5]])
    b1 = jnp.array([0.1, -0.2, 0.05, 0.0])
    w2 = jnp.array([[1.0, 0.5, -0.3, 0.8], [-0.6, 0.4, 0.9, -0.2], [0.2, -0.8, 0.1, 0.3]])
    b2 = jnp.array([0.5, 0.0, -0.1])
    return lambda x: w2 @ jax.nn.relu(w1 @ x + b1) + b2


def test_round_trip_robustness_through_branch_and_bound(tmp_path):
    fn = _net()
    x0 = jnp.array([0.3, 0.2])
    label = int(jnp.argmax(fn(x0)))
    small = vf.read_vnnlib(_write(tmp_path, _robustness_text([0.3, 0.2], 0.05, label, 3)))
    res = vf.branch_and_bound(fn, *small[:2], threshold=small[2], method="crown")
    assert res.status == "verified" and res.lower_bound > 0
    # Check on samples that the property really holds (argmax stays the label).
    box = small[0]
    xs = jax.random.uniform(jax.random.key(1), (2000, 2), minval=box.lower, maxval=box.upper)
    assert np.all(np.asarray(jnp.argmax(jax.vmap(fn)(xs), axis=1)) == label)
    big = vf.read_vnnlib(_write(tmp_path, _robustness_text([0.3, 0.2], 3.0, label, 3), "b.vnnlib"))
    res = vf.branch_and_bound(fn, *big[:2], threshold=big[2], method="crown")
    assert res.status == "falsified"
    y = fn(res.counterexample)
    assert int(jnp.argmax(y)) != label or bool(jnp.any(jnp.delete(y, label) >= y[label]))


def test_round_trip_conjunction_with_groups(tmp_path):
    fn = _net()
    text = _declare(2, 3) + "(assert (and (<= X_0 0.4) (>= X_0 0.2) (<= X_1 0.3) (>= X_1 0.1)))\n"
    text += "(assert (and (>= Y_1 Y_0) (>= Y_1 Y_2)))\n"  # unsafe: Y_1 is maximal
    box, spec, threshold, groups = vf.read_vnnlib(_write(tmp_path, text), return_groups=True)
    res = vf.branch_and_bound(fn, box, spec, threshold=threshold, groups=groups, method="crown")
    xs = jax.random.uniform(jax.random.key(2), (4000, 2), minval=box.lower, maxval=box.upper)
    ys = np.asarray(jax.vmap(fn)(xs))
    unsafe = (ys[:, 1] >= ys[:, 0]) & (ys[:, 1] >= ys[:, 2])
    assert res.status == ("falsified" if unsafe.any() else "verified")
    assert not unsafe.any()  # Y_0 dominates on this box


MALFORMED = [
    ("(declare-const X_0 Real)\n(assert (<= X_0 1)", "unbalanced"),
    ("(declare-const X_0 Real))", "unbalanced"),
    ("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= X_1 1))", "not declared"),
    ("(declare-const Z_0 Real)", "X_<i> or Y_<j>"),
    ("(declare-const X_0 Int)", "declare-const NAME Real"),
    ("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= (* X_0 Y_0) 1))", "linear"),
    ("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= X_0 Y_0))", "mix"),
    (
        "(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= X_0 1))(assert (<= Y_0 0))",
        "finite lower and upper",
    ),
    (
        "(declare-const X_0 Real)(declare-const X_1 Real)(declare-const Y_0 Real)"
        "(assert (<= (+ X_0 X_1) 1))",
        "single variable",
    ),
    (
        "(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= X_0 1))(assert (>= X_0 0))",
        "no output",
    ),
    (
        "(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= X_0 0))(assert (>= X_0 1))"
        "(assert (<= Y_0 0))",
        "empty range",
    ),
    (
        "(declare-const X_0 Real)(declare-const Y_0 Real)"
        "(assert (or (and (<= X_0 1) (>= X_0 0) (<= Y_0 0))))",
        "several input boxes",
    ),
    (
        "(declare-const X_0 Real)(declare-const Y_0 Real)(assert (not (<= Y_0 0)))",
        "unsupported operator",
    ),
    ("(declare-fun X_0 () Real)", "unsupported command"),
    ("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= Y_0 foo))", "unknown symbol"),
    ("(declare-const X_1 Real)(declare-const Y_0 Real)", "numbered 0..0"),
]


@pytest.mark.parametrize("text,match", MALFORMED)
def test_malformed_files_raise_clear_errors(tmp_path, text, match):
    p = _write(tmp_path, text)
    with pytest.raises(ValueError, match=match) as info:
        vf.read_vnnlib(p)
    assert str(p) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        vf.read_vnnlib(tmp_path / "absent.vnnlib")

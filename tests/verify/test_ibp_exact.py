"""``ibp_exact``: variables whose IBP interval is already exact skip their CROWN pass."""

import jax
import jax.numpy as jnp
import numpy as np

from linjax import verify as vf
from linjax.verify import _crown, _graph


def _exact_shapes(fn, x):
    graph = _graph.trace(fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
    exact = _crown.ibp_exact(graph)
    return graph, exact


def test_first_layers_are_exact_and_later_ones_are_not(getkey):
    w1 = jax.random.normal(getkey(), (6, 4))
    w2 = jax.random.normal(getkey(), (5, 6))
    k = jax.random.normal(getkey(), (3, 1, 2, 2))

    def mlp(x):
        return w2 @ jax.nn.relu(w1 @ (2 * x.reshape(4) + 1) + 0.5)

    graph, exact = _exact_shapes(mlp, jnp.zeros((2, 2)))
    relu_in = [n.inputs[0] for n in graph.nodes if n.primitive.name == "max"]
    assert relu_in[0] in exact  # w1 @ (2x + 1) + 0.5: one mixing op on independent values
    assert graph.output not in exact  # after the ReLU

    def conv(x):
        y = jax.lax.conv_general_dilated(x[None], k, (1, 1), "VALID")[0]
        return jnp.tanh(y + 1.0).sum() + (y.sum() - y.sum())

    graph, exact = _exact_shapes(conv, jnp.zeros((1, 3, 3)))
    tanh_in = next(n.inputs[0] for n in graph.nodes if n.primitive.name == "tanh")
    assert tanh_in in exact

    def twice(x):  # two mixing ops in a row: |W2||W1| r is not the exact radius
        return jnp.tanh(w2 @ (w1 @ x))

    graph, exact = _exact_shapes(twice, jnp.zeros(4))
    tanh_in = next(n.inputs[0] for n in graph.nodes if n.primitive.name == "tanh")
    assert tanh_in not in exact

    def duplicated(x):  # x - x: broadcasting repeats elements, IBP is not exact afterwards
        return jnp.tanh(jnp.broadcast_to(x, (2, 4)).sum(0) - 2 * x)

    graph, exact = _exact_shapes(duplicated, jnp.zeros(4))
    tanh_in = next(n.inputs[0] for n in graph.nodes if n.primitive.name == "tanh")
    assert tanh_in not in exact


def test_skipping_exact_variables_keeps_crown_unchanged(getkey):
    """Against a dense float64 CROWN written out by hand (first layer by CROWN too)."""
    w1, w2, w3 = (jax.random.normal(getkey(), s) for s in ((7, 4), (6, 7), (3, 6)))
    b1, b2 = jax.random.normal(getkey(), (7,)), jax.random.normal(getkey(), (6,))

    def net(x):
        return w3 @ jax.nn.relu(w2 @ jax.nn.relu(w1 @ x + b1) + b2)

    box = vf.Box.from_eps(jax.random.normal(getkey(), (4,)), 0.4)
    c, r = np.asarray(box.center), np.asarray(box.radius)
    W1, W2, W3 = (np.asarray(w, np.float64) for w in (w1, w2, w3))
    B1, B2 = np.asarray(b1, np.float64), np.asarray(b2, np.float64)

    def relax(l, u):
        cross = (l < 0) & (u > 0)
        k = np.where(cross, u / np.where(cross, u - l, 1), (l >= 0) * 1.0)
        aL = np.where(cross, (u > -l) * 1.0, (l >= 0) * 1.0)
        return aL, k, np.where(cross, -k * l, 0.0)

    def lower(lam, steps):  # min over the box of lam @ (steps, applied from the output)(x)
        bias = 0.0
        for step in steps:
            if step[0] == "relu":
                aL, aU, cU = step[1]
                lp, ln = np.maximum(lam, 0), np.minimum(lam, 0)
                bias = bias + ln @ cU
                lam = lp * aL + ln * aU
            else:
                bias = bias + lam @ step[2]
                lam = lam @ step[1]
        return lam @ c - np.abs(lam) @ r + bias

    def both(steps, n):
        eye = np.eye(n)
        return lower(eye, steps), -lower(-eye, steps)

    first = [("lin", W1, B1)]
    l1, u1 = both(first, 7)
    second = [("lin", W2, B2), ("relu", relax(l1, u1)), *first]
    l2, u2 = both(second, 6)
    lo, hi = both([("lin", W3, np.zeros(3)), ("relu", relax(l2, u2)), *second], 3)
    out = vf.crown(net, box)
    np.testing.assert_allclose(out.lower, lo, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out.upper, hi, rtol=1e-10, atol=1e-10)

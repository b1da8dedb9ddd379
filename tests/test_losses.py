"""rnnjax.train.losses: masked losses against unpadded references, padding (NaN and Inf
included) that reaches neither a loss nor its gradient, out-of-range labels (an error
eagerly, NaN under jit), and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnjax as rj
from tests.helpers import assert_trees_close

T = rj.train
C = 5
F32 = dict(atol=1e-6, rtol=1e-5)  # float32 rounding
EXACT = dict(atol=0, rtol=0)


def test_sequence_mask():
    mask = T.sequence_mask(jnp.array([[0, 2], [4, 1]]), 3)
    np.testing.assert_array_equal(mask, [[[0, 0, 0], [1, 1, 0]], [[1, 1, 1], [1, 0, 0]]])
    assert mask.dtype == jnp.bool_


# two batch axes, a length 0 and a full length; labels -1 at padding. Module-level arrays are
# computed in NumPy: a jnp operation here compiles when the module is collected, in every
# xdist worker.
RNG = np.random.default_rng(3)
LOGITS = jnp.asarray(RNG.normal(size=(2, 2, 6, C)), jnp.float32)
LABELS = jnp.asarray(RNG.integers(0, C, (2, 2, 6)), jnp.int32)
LENS2 = jnp.array([[6, 0], [2, 5]])
REAL_STEPS = np.arange(6) < np.asarray(LENS2)[..., None]  # (2, 2, 6)
PADDED_LABELS = jnp.asarray(np.where(REAL_STEPS, np.asarray(LABELS), -1))


def unpadded(values, lengths):
    """Concatenate the real steps of every sequence: (*batch, T, ...) -> (N, ...), in numpy."""
    values = np.asarray(values)
    flat = values.reshape((-1,) + values.shape[np.ndim(lengths) :])
    return np.concatenate([flat[i, :n] for i, n in enumerate(np.asarray(lengths).ravel())])


def test_softmax_cross_entropy_integer_labels_is_the_mean_over_real_steps():
    loss = T.softmax_cross_entropy(LOGITS, PADDED_LABELS, LENS2)
    ref = optax.softmax_cross_entropy_with_integer_labels(unpadded(LOGITS, LENS2), unpadded(LABELS, LENS2)).mean()
    assert_trees_close(loss, ref, **F32)
    # without lengths: every step counts
    assert_trees_close(T.softmax_cross_entropy(LOGITS, LABELS), optax.softmax_cross_entropy_with_integer_labels(LOGITS, LABELS).mean(), **F32)
    # under jit with traced lengths: the same number
    assert_trees_close(jax.jit(T.softmax_cross_entropy)(LOGITS, PADDED_LABELS, LENS2), ref, **F32)


def test_softmax_cross_entropy_probability_labels():
    onehot = jax.nn.one_hot(LABELS, C)
    assert_trees_close(T.softmax_cross_entropy(LOGITS, onehot, LENS2), T.softmax_cross_entropy(LOGITS, LABELS, LENS2), **F32)
    probs = jax.nn.softmax(RNG.normal(size=LOGITS.shape).astype(np.float32))
    ref = optax.softmax_cross_entropy(unpadded(LOGITS, LENS2), unpadded(probs, LENS2)).mean()
    assert_trees_close(T.softmax_cross_entropy(LOGITS, probs, LENS2), ref, **F32)


STEP_PADDING = jnp.asarray(~REAL_STEPS)  # (2, 2, 6): True past a length
SEQ_PADDING = jnp.asarray(np.asarray(LENS2) == 0)  # (2, 2): sequences without a last step
_EXP = np.exp(RNG.normal(size=LOGITS.shape).astype(np.float32))
PROBS = jnp.asarray(_EXP / _EXP.sum(-1, keepdims=True))  # a softmax


def sum_of_last_steps(ys, _, lengths):
    return jnp.sum(T.last_step(ys, lengths) ** 2)


# name: (loss(x, y, lengths), y, where y is padding); x is LOGITS, padded past the lengths
PADDED_LOSSES = {
    "softmax_cross_entropy-int": (T.softmax_cross_entropy, LABELS, STEP_PADDING),
    "softmax_cross_entropy-probs": (T.softmax_cross_entropy, PROBS, jnp.asarray(~REAL_STEPS[..., None])),
    "last_step_cross_entropy-int": (T.last_step_cross_entropy, jnp.asarray(np.asarray(LABELS)[..., 0]), SEQ_PADDING),
    "last_step_cross_entropy-probs": (T.last_step_cross_entropy, jnp.asarray(np.asarray(PROBS)[..., 0, :]),
                                      jnp.asarray(np.asarray(SEQ_PADDING)[..., None])),
    "mean_squared_error": (T.mean_squared_error, PROBS, jnp.asarray(~REAL_STEPS[..., None])),
    "last_step": (sum_of_last_steps, PROBS, jnp.asarray(~REAL_STEPS[..., None])),
}


@functools.cache
def value_and_grad(fn):
    """The jitted value and gradient (w.r.t. logits or preds) of a loss, shared by the tests."""
    return jax.jit(jax.value_and_grad(fn))


@pytest.mark.parametrize("pad", [np.nan, np.inf, -np.inf, 1e30])
@pytest.mark.parametrize("name", PADDED_LOSSES)
def test_padding_reaches_neither_the_loss_nor_its_gradient(name, pad):
    fn, y, y_padding = PADDED_LOSSES[name]
    x_padding = STEP_PADDING[..., None]
    f = value_and_grad(fn)
    clean = f(jnp.where(x_padding, 0.0, LOGITS), jnp.where(y_padding, 0, y), LENS2)
    # integer labels cannot be NaN: out-of-range class indices stand for garbage there
    y_pad = jnp.where(y_padding, 2**31 - 1 if y.dtype == jnp.int32 else pad, y)
    loss, grad = f(jnp.where(x_padding, pad, LOGITS), y_pad, LENS2)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
    # the same program on the same real values: bit for bit the same numbers
    assert_trees_close((loss, grad), clean, **EXACT)
    assert not np.any(np.where(x_padding, grad, 0.0))  # no gradient reaches padded steps


def test_no_real_step_gives_zero_and_finite_gradients():
    zero = jnp.zeros((2, 2), jnp.int32)
    for fn, labels in [
        (T.softmax_cross_entropy, LABELS),
        (T.last_step_cross_entropy, LABELS[..., 0]),
        (T.mean_squared_error, LOGITS + 1.0),
    ]:
        value, grad = jax.jit(jax.value_and_grad(fn))(LOGITS, labels, zero)
        assert float(value) == 0.0 and np.all(np.isfinite(grad))


def test_bfloat16_logits_give_a_float32_loss():
    loss = T.softmax_cross_entropy(LOGITS.astype(jnp.bfloat16), LABELS)
    assert loss.dtype == jnp.float32
    assert_trees_close(loss, T.softmax_cross_entropy(LOGITS, LABELS), atol=0.05, rtol=0.05)


def test_last_step_takes_each_sequences_last_real_output():
    ys = RNG.normal(size=(2, 2, 6, 3)).astype(np.float32)
    out = np.asarray(T.last_step(ys, LENS2))
    for i in range(2):
        for j in range(2):
            n = int(LENS2[i, j])
            expected = ys[i, j, n - 1] if n else np.zeros(3)
            np.testing.assert_array_equal(out[i, j], expected)
    np.testing.assert_array_equal(T.last_step(ys), ys[..., -1, :])
    # on rj.scan's outputs it is the final hidden state
    cell = rj.GRU(4)
    xs = jnp.asarray(RNG.normal(size=(3, 8, 3)), jnp.float32)
    lengths = jnp.array([8, 6, 3])
    ys, h = rj.scan(cell, cell.init(jax.random.key(0), 3), xs, lengths=lengths)
    assert_trees_close(T.last_step(ys, lengths), h, **F32)


def test_last_step_cross_entropy_against_the_gathered_logits():
    labels = LABELS[..., 0]
    loss = T.last_step_cross_entropy(LOGITS, labels, LENS2)
    # the length-0 sequence (0, 1) is left out
    logits, classes = np.asarray(LOGITS), np.asarray(labels)
    picks = [(0, 0, 5), (1, 0, 1), (1, 1, 4)]
    ref = optax.softmax_cross_entropy_with_integer_labels(
        np.stack([logits[i, j, t] for i, j, t in picks]), np.stack([classes[i, j] for i, j, _ in picks])
    ).mean()
    assert_trees_close(loss, ref, **F32)
    assert_trees_close(T.last_step_cross_entropy(LOGITS, jax.nn.one_hot(labels, C), LENS2), ref, **F32)
    ref_all = optax.softmax_cross_entropy_with_integer_labels(LOGITS[..., -1, :], labels).mean()
    assert_trees_close(T.last_step_cross_entropy(LOGITS, labels), ref_all, **F32)


def test_mean_squared_error_over_real_steps_and_features():
    targets = RNG.normal(size=LOGITS.shape).astype(np.float32)
    loss = T.mean_squared_error(LOGITS, targets, LENS2)
    ref = np.mean((np.asarray(unpadded(LOGITS, LENS2)) - np.asarray(unpadded(targets, LENS2))) ** 2)
    assert_trees_close(loss, ref, **F32)
    assert_trees_close(T.mean_squared_error(LOGITS, targets), np.mean((np.asarray(LOGITS) - np.asarray(targets)) ** 2), **F32)


# The arguments are built when a test runs, not when the module is collected.
LOSS_ERRORS = [
    (T.softmax_cross_entropy, lambda: (LOGITS, LABELS[..., :5]), ValueError,
     r"labels has dtype int32 and shape \(2, 2, 5\); integer labels are class indices of shape \(\*batch, T\) = "
     r"\(2, 2, 6\) for logits of shape \(2, 2, 6, 5\) \(float labels are class probabilities of shape "
     r"\(\*batch, T, C\) = \(2, 2, 6, 5\)\)"),
    (T.softmax_cross_entropy, lambda: (LOGITS, LABELS > 2), TypeError, "labels has dtype bool; expected integer class indices"),
    (T.softmax_cross_entropy, lambda: (LOGITS, jnp.ones((2, 2, 6, 4))), ValueError,
     r"labels has dtype float32 and shape \(2, 2, 6, 4\); float labels are class probabilities of shape "
     r"\(\*batch, T, C\) = \(2, 2, 6, 5\) for logits .* \(integer labels are class indices of shape \(\*batch, T\)"),
    # float labels with the shape of class indices: the message says so, and how to cast
    (T.softmax_cross_entropy, lambda: (LOGITS, jnp.ones((2, 2, 6))), ValueError,
     r"labels has dtype float32 and shape \(2, 2, 6\); float labels are class probabilities of shape "
     r"\(\*batch, T, C\) = \(2, 2, 6, 5\) for logits of shape \(2, 2, 6, 5\); for class indices of shape "
     r"\(\*batch, T\) = \(2, 2, 6\), cast them: labels.astype\(jnp.int32\)"),
    (T.softmax_cross_entropy, lambda: (LOGITS, LABELS, jnp.array([6, 6])), ValueError,
     r"lengths has shape \(2,\); expected \(2, 2\), the batch shape of logits of shape \(2, 2, 6, 5\)"),
    (T.softmax_cross_entropy, lambda: (LOGITS, LABELS, jnp.full((2, 2), 3.0)), TypeError, "lengths has dtype float32; expected an integer"),
    (T.softmax_cross_entropy, lambda: (LABELS, LABELS), TypeError, "logits has dtype int32; expected a floating dtype"),
    (T.softmax_cross_entropy, lambda: (jnp.ones(5), jnp.ones(5)), ValueError, r"logits has shape \(5,\); expected \(\*batch, T, C\)"),
    (T.last_step_cross_entropy, lambda: (LOGITS, LABELS), ValueError,
     r"labels has dtype int32 and shape \(2, 2, 6\); integer labels are class indices of shape \(\*batch,\) = "
     r"\(2, 2\) .* \(\*batch, C\) = \(2, 2, 5\)"),
    (T.last_step_cross_entropy, lambda: (LOGITS, jnp.ones((2, 2))), ValueError,
     r"labels has dtype float32 and shape \(2, 2\); float labels are class probabilities of shape \(\*batch, C\) "
     r"= \(2, 2, 5\) .*cast them"),
    (T.last_step_cross_entropy, lambda: (LOGITS, LABELS[..., 0], jnp.array([1, 2, 3])), ValueError, r"lengths has shape \(3,\); expected \(2, 2\)"),
    (T.last_step, lambda: (jnp.ones((2, 0, 3)),), ValueError, r"ys has shape \(2, 0, 3\); expected \(\*batch, T, F\) with T >= 1"),
    (T.mean_squared_error, lambda: (LOGITS, LOGITS[..., :3]), ValueError, r"targets has shape \(2, 2, 6, 3\); expected \(2, 2, 6, 5\)"),
    (T.mean_squared_error, lambda: (LOGITS, LABELS[..., None]), TypeError, "targets has dtype int32; expected a floating dtype"),
    (T.sequence_mask, lambda: (jnp.array([1.0]), 3), TypeError, "lengths has dtype float32"),
]


@pytest.mark.parametrize("fn, make_args, error, message", LOSS_ERRORS,
                         ids=lambda v: "" if getattr(v, "__name__", "") == "<lambda>" else getattr(v, "__name__", ""))
def test_loss_bad_input_raises_a_clear_error_at_trace_time(fn, make_args, error, message):
    args = make_args()
    with pytest.raises(error, match=message):
        fn(*args)
    with pytest.raises(error, match=message):
        jax.jit(lambda: fn(*args))()


@pytest.mark.parametrize(
    "fn, targets, length, message",
    [
        (T.softmax_cross_entropy, LABELS, 7, r"lengths has the value 7; expected every length in \[0, T=6\]"),
        (T.mean_squared_error, LOGITS, -1, r"lengths has the value -1"),
    ],
)
def test_concrete_out_of_range_lengths_are_rejected(fn, targets, length, message):
    with pytest.raises(ValueError, match=message):
        fn(LOGITS, targets, jnp.full((2, 2), length))


# (loss, labels with padding, a real and a padded position)
LABELLED = {
    "softmax_cross_entropy": (T.softmax_cross_entropy, PADDED_LABELS, (1, 0, 1), (1, 0, 2)),
    "last_step_cross_entropy": (T.last_step_cross_entropy, jnp.asarray(np.asarray(LABELS)[..., 0]), (1, 0), (0, 1)),
}


@pytest.mark.parametrize("bad", [-1, C, 2**31 - 1])
@pytest.mark.parametrize("name", LABELLED)
def test_out_of_range_labels_raise_eagerly_and_give_a_nan_loss_under_jit(name, bad):
    fn, labels, real, padded = LABELLED[name]
    wrong = labels.at[real].set(bad)
    with pytest.raises(ValueError, match=rf"labels has the value {bad} at a real step; expected class indices in \[0, C=5\)"):
        fn(LOGITS, wrong, LENS2)
    # traced labels cannot raise: the loss is NaN, never a finite number for a wrong class
    loss, grad = value_and_grad(fn)(LOGITS, wrong, LENS2)
    assert np.isnan(float(loss))
    assert np.all(np.isfinite(grad)) and not np.any(grad[real])  # that step gives no gradient
    # at a padded position any label is fine
    assert_trees_close(value_and_grad(fn)(LOGITS, labels.at[padded].set(bad), LENS2), value_and_grad(fn)(LOGITS, labels, LENS2), **EXACT)
    # without lengths every step is real
    everywhere = jnp.where(wrong < 0, 0, wrong) if bad >= 0 else jnp.where(labels < 0, 0, labels).at[real].set(bad)
    assert np.isnan(float(jax.jit(fn)(LOGITS, everywhere)))

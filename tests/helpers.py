"""The one comparison of pytrees of arrays the tests use."""

import jax
import jax.numpy as jnp
import numpy as np


def assert_trees_close(actual, expected, *, atol, rtol, err_msg="", check_dtypes=False):
    """Assert one tree structure and, leaf by leaf, ``|actual - expected| <= atol + rtol * |expected|``.

    Each leaf pair goes through ``np.testing.assert_allclose`` (NaNs in the same places are
    equal; a scalar broadcasts, other shapes must match); ``atol=0, rtol=0`` asserts exact
    equality. ``check_dtypes`` also asserts equal dtypes (as ``jnp.result_type`` canonicalizes
    them) and equal shapes. A failure names the leaf by its path, after ``err_msg``.
    """
    structure, expected_structure = jax.tree.structure(actual), jax.tree.structure(expected)
    assert structure == expected_structure, f"{err_msg}: tree structures differ: {structure} != {expected_structure}"
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(actual)[0]
    for (path, x), y in zip(leaves_with_paths, jax.tree.leaves(expected), strict=True):
        where = f"{err_msg}{jax.tree_util.keystr(path)}"
        if check_dtypes:
            assert jnp.result_type(x) == jnp.result_type(y), f"{where}: dtype {jnp.result_type(x)} != {jnp.result_type(y)}"
            assert np.shape(x) == np.shape(y), f"{where}: shape {np.shape(x)} != {np.shape(y)}"
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol, err_msg=where)


def max_abs_diff(a, b):
    """``max |a - b|`` over every element of every leaf pair of two trees (a float, for reports)."""
    return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

"""Host casts of activations: the dtype asked for, bit-exact rounding, and float16 overflow refused."""

import ml_dtypes
import numpy as np
import pytest

from harvest.floats import FloatOverflowError, cast, float_dtype


def test_cast_is_numpys_rounding_and_a_no_op_when_the_dtype_matches():
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32) * 100
    assert cast(x, "float32") is x
    for name, dtype in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        y = cast(x, name)
        assert y.dtype == float_dtype(name) == np.dtype(dtype)
        np.testing.assert_array_equal(y.view(np.uint16), x.astype(dtype).view(np.uint16))
        assert cast(y, name) is y


def test_float16_overflow_is_refused_but_inputs_already_infinite_pass():
    with pytest.raises(FloatOverflowError, match="activations up to 70000 overflow float16; use capture.dtype"):
        cast(np.array([[1.0, -70000.0]], np.float32), "float16")
    assert cast(np.array([65504.0], np.float32), "float16")[0] == 65504  # the largest float16 is kept
    assert cast(np.array([1e30], np.float32), "bfloat16")[0] == np.float32(1e30).astype(ml_dtypes.bfloat16)
    y = cast(np.array([np.inf, 1.0], np.float32), "float16")  # the model's own inf is data, not overflow
    assert np.isinf(y[0]) and y[1] == 1


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="float dtype 'int8' is not one of bfloat16, float16, float32"):
        float_dtype("int8")

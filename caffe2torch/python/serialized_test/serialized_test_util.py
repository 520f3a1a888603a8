"""Caffe2's ``serialized_test_util``: ``SerializedTestCase`` and ``given``, what Caffe2's
operator tests import.

Caffe2 also saved each test's first example (inputs and outputs) to compare later runs with;
caffe2torch runs the checks only (``assertSerializedOperatorChecks`` is a reference check), so
its own op tests stay the regression record.
"""
from hypothesis import given as _given

from caffe2torch.python import hypothesis_test_util as hu


def given(*given_args, **given_kwargs):
    """hypothesis.given (Caffe2's wrapper also recorded the first example)."""
    return _given(*given_args, **given_kwargs)


class SerializedTestCase(hu.HypothesisTestCase):
    """A HypothesisTestCase (Caffe2's, without the saved-output comparison)."""

    should_serialize = False

    def assertSerializedOperatorChecks(self, inputs, outputs, gradient_operator, op,
                                       device_option, atol=1e-4, rtol=1e-4):
        """Caffe2 compared with saved outputs; there are none here, so nothing to compare."""
        return None

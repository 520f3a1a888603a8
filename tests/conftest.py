"""Fixtures shared by the test modules."""
import pytest

from caffe2torch.python import workspace


@pytest.fixture
def fresh_workspace(tmp_path):
    """An empty workspace rooted in the test's tmp folder (yielded), emptied again afterwards."""
    workspace.ResetWorkspace(str(tmp_path))
    yield tmp_path
    workspace.ResetWorkspace()

"""Fixtures shared by the test modules."""
import subprocess

import pytest

from caffe2torch.python import workspace


@pytest.fixture
def fresh_workspace(tmp_path):
    """An empty workspace rooted in the test's tmp folder (yielded), emptied again afterwards."""
    workspace.ResetWorkspace(str(tmp_path))
    yield tmp_path
    workspace.ResetWorkspace()


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(options, name)``: a tmpfs mounted on ``tmp_path/name`` (e.g. ``"size=128k"``,
    ``"ro,size=1m"``), unmounted after the test; skips where mounting is refused (needs root)."""
    mounted = []

    def mount(options, name="tmpfs"):
        folder = tmp_path / name
        folder.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot mount a tmpfs here ({e})")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)

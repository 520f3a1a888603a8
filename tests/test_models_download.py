"""models.download: install a zoo model from a mirror, import it as caffe2torch.python.models.X."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, models
from caffe2torch.python.models import download

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mirror(tmp_path):
    """A file:// mirror holding model `tiny` (FC 3 -> 2, then Softmax) in the zoo's layout."""
    folder = tmp_path / "mirror" / "tiny"
    folder.mkdir(parents=True)
    init = core.Net("tiny_init")
    init.GivenTensorFill([], "fc_w", shape=[2, 3], values=[1.0, 0.0, -1.0, 0.5, 0.5, 0.5])
    init.GivenTensorFill([], "fc_b", shape=[2], values=[0.1, -0.1])
    predict = core.Net("tiny_predict")
    predict.Softmax(predict.FC(["data", "fc_w", "fc_b"], "fc"), "softmax")
    predict.Proto().external_input.extend(["data", "fc_w", "fc_b"])
    predict.Proto().external_output.append("softmax")
    (folder / "init_net.pb").write_bytes(init.Proto().SerializeToString())
    (folder / "predict_net.pb").write_bytes(predict.Proto().SerializeToString())
    return folder.parent.as_uri() + "/"


def test_install_then_import_and_predict_as_model_quickload_does(mirror, tmp_path):
    installed = tmp_path / "models"
    env = dict(os.environ, CAFFE2TORCH_MODELS=str(installed), PYTHONPATH=str(ROOT))
    cli = [sys.executable, "-m", "caffe2torch.python.models.download", "-i", "tiny",
           "--base_url", mirror]
    r = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (installed / "tiny").iterdir()) == [
        "__init__.py", "init_net.pb", "predict_net.pb"]
    script = ("import numpy as np\n"
              "from caffe2torch.python import workspace\n"
              "from caffe2torch.python.models import tiny as mynet\n"
              "p = workspace.Predictor(mynet.init_net, mynet.predict_net)\n"
              "print(repr(p.run({'data': np.array([[1, 2, 3]], np.float32)})[0].tolist()))\n")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    logits = np.array([1 - 3 + 0.1, 0.5 * 6 - 0.1])
    expected = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(eval(r.stdout.strip().splitlines()[-1]), [expected], rtol=1e-6)


def test_plain_download_goes_to_the_working_folder(mirror, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert download.main(["tiny", "--base_url", mirror]) == 0
    net = caffe2_pb2.NetDef()
    net.ParseFromString((tmp_path / "tiny" / "predict_net.pb").read_bytes())
    assert [op.type for op in net.op] == ["FC", "Softmax"]
    assert not (tmp_path / "tiny" / "__init__.py").exists()


def test_existing_model_needs_force(mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAFFE2TORCH_MODELS", str(tmp_path / "models"))
    assert download.main(["-i", "tiny", "--base_url", mirror]) == 0
    assert download.main(["-i", "tiny", "--base_url", mirror]) == 1
    assert "already exists: pass -f" in capsys.readouterr().err
    assert download.main(["-i", "-f", "tiny", "--base_url", mirror]) == 0


def test_lfs_pointer_is_refused_and_nothing_is_left(tmp_path, monkeypatch, capsys):
    src = tmp_path / "mirror" / "tiny"
    src.mkdir(parents=True)
    for name in download.MODEL_FILES:
        (src / name).write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    monkeypatch.setenv("CAFFE2TORCH_MODELS", str(tmp_path / "models"))
    assert download.main(["-i", "tiny", "--base_url", src.parent.as_uri()]) == 1
    assert "Git LFS pointer" in capsys.readouterr().err
    assert not (tmp_path / "models" / "tiny").exists()


def test_file_over_the_size_limit_is_refused_and_nothing_is_left(mirror, tmp_path, monkeypatch,
                                                                  capsys):
    from caffe2torch import limits
    monkeypatch.setattr(limits, "MAX_BLOB_BYTES", 16)
    monkeypatch.setenv("CAFFE2TORCH_MODELS", str(tmp_path / "models"))
    assert download.main(["-i", "tiny", "--base_url", mirror]) == 1
    assert "larger than 16 bytes" in capsys.readouterr().err
    assert not (tmp_path / "models" / "tiny").exists()


def test_missing_file_says_which_url(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert download.main(["nosuchmodel", "--base_url", tmp_path.as_uri()]) == 1
    assert "Could not download model. [URL Error]" in capsys.readouterr().err
    assert not (tmp_path / "nosuchmodel").exists()


@pytest.mark.parametrize("name, ok", [("squeezenet", True), ("bvlc_alexnet", True),
                                      ("resnet50", True), ("__init__", False),
                                      ("../etc", False), ("9lives", False)])
def test_model_names(name, ok):
    assert download.validModelName(name) is ok


def test_default_url_is_caffe2s(monkeypatch):
    monkeypatch.delenv(download.BASE_URL_ENV, raising=False)
    assert download.getURLFromName("squeezenet", "init_net.pb") == (
        "https://github.com/caffe2/models/raw/master/squeezenet/init_net.pb")


def test_install_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CAFFE2TORCH_MODELS", str(tmp_path))
    assert models.install_folder() == str(tmp_path)
    monkeypatch.delenv("CAFFE2TORCH_MODELS")
    assert models.install_folder() == os.path.expanduser("~/.caffe2torch/models")

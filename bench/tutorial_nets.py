"""The tutorial's nets for the benchmarks, as notebooks/02_build.ipynb writes them (the NetDef is
the single truth: no bench rebuilds the model itself)."""
import os
import subprocess
import sys
import tempfile

from caffe2torch.proto import caffe2_pb2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_nets(data_dir, device):
    """Run notebooks 01_download and 02_build into a temporary run folder; its workspace/."""
    run_dir = tempfile.mkdtemp(prefix="c2t-bench-run-")
    for notebook, params in (("01_download", {"data_dir": data_dir}), ("02_build", {"device": device})):
        out = os.path.join(run_dir, f"{notebook}.ipynb")
        cmd = [sys.executable, "-m", "papermill", "-k", "caffe2torch", "--cwd", REPO,
               os.path.join(REPO, "notebooks", f"{notebook}.ipynb"), out, "-p", "run_dir", run_dir]
        for key, value in params.items():
            cmd += ["-p", key, value]
        print(f"running {notebook} (papermill) into {run_dir}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return os.path.join(run_dir, "workspace")


def load_net(nets_dir, name):
    """The NetDef ``<nets_dir>/<name>.pb``."""
    path = os.path.join(nets_dir, f"{name}.pb")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist: --nets must be a run's workspace/ folder, "
                         "written by notebooks/02_build.ipynb")
    net = caffe2_pb2.NetDef()
    with open(path, "rb") as f:
        net.ParseFromString(f.read())
    return net

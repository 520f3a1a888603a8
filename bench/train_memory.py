"""Peak RSS of the tutorial's train and test iterations at a few batch sizes, each in a fresh
child process: ``python bench/train_memory.py [DB_DIR]``. Prints MiB per batch size and the
per-image slope that pipeline/params.py's batch-size bounds are derived from (8 GiB Job limit)."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys, tempfile
from caffe2torch.python import workspace
from mnist_tutorial import lenet
net_kind, batch, train_db, test_db = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
workspace.ResetWorkspace(tempfile.mkdtemp())  # the Print/Summarize ops' files go there
train, test, _ = lenet.build_models(train_db, test_db, train_batch_size=batch,
                                    test_batch_size=batch)
model = train if net_kind == "train" else test
workspace.RunNetOnce(train.param_init_net)
workspace.RunNetOnce(model.param_init_net)
workspace.CreateNet(model.net, overwrite=True)
for _ in range(2):
    workspace.RunNet(model.net.Proto().name)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main():
    """Measure and print the table."""
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    dbs = [root / f"mnist-{s}-nchw-lmdb" for s in ("train", "test")]
    if not dbs[0].exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from mnist_idx import load_mnist_test

        from caffe2torch.binaries.make_mnist_db import write_mnist_db
        images, labels = load_mnist_test()
        for path in dbs:
            write_mnist_db(images[:1000], labels[:1000], str(path), "lmdb", channel_first=True)
    result = {}
    for kind in ("train", "test"):
        for batch in (64, 1000, 4000):
            out = subprocess.run([sys.executable, "-c", CHILD, kind, str(batch), *map(str, dbs)],
                                 capture_output=True, text=True, check=True).stdout
            result[(kind, batch)] = float(out.split()[-1])
            print(f"{kind:5s} batch {batch:6d}: peak RSS {result[(kind, batch)]:8.1f} MiB",
                  flush=True)
        slope = (result[(kind, 4000)] - result[(kind, 1000)]) / 3000
        print(f"{kind:5s}: {slope * 1024:.0f} KiB per image; 8 GiB minus 1 GiB margin holds "
              f"{(7 * 1024 - result[(kind, 64)]) / slope:,.0f} images per batch")
    print(json.dumps({f"{k}_{b}": v for (k, b), v in result.items()}))


if __name__ == "__main__":
    main()

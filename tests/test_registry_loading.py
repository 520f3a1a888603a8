"""A family that fails to import makes every registry lookup name that family and why,
instead of answering from a half-loaded registry."""
import subprocess
import sys
import textwrap


def test_a_broken_family_is_named_by_every_lookup(tmp_path):
    # Run in a fresh interpreter with a broken family module added to a copy of the package path.
    code = textwrap.dedent("""
        import sys
        import caffe2torch.ops as ops
        ops.FAMILY_NAMES = ("nn", "aaa_broken") + tuple(
            n for n in ops.FAMILY_NAMES if n != "nn")
        class Finder:
            def find_spec(self, name, path=None, target=None):
                if name != "caffe2torch.ops.aaa_broken":
                    return None
                import importlib.machinery
                return importlib.machinery.ModuleSpec(name, self)
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                raise RuntimeError("simulated bug in a family")
        sys.meta_path.insert(0, Finder())
        from caffe2torch.ops import registry
        for attempt in range(2):
            try:
                registry.get_schema("CreateDB")
            except ImportError as exc:
                print("ERR", exc)
        try:
            registry.is_registered("Relu")
        except ImportError as exc:
            print("ERR", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(tmp_path), env=None, check=True).stdout.splitlines()
    assert len(out) == 3
    assert all("caffe2torch.ops.aaa_broken failed to import" in line and
               "simulated bug in a family" in line for line in out), out

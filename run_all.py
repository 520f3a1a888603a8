#!/usr/bin/env python3
"""Run the MNIST notebooks with papermill: ``python run_all.py [-f PARAMS.yaml] [-p KEY=VALUE ...]``.

Steps (notebooks/): download, build, train, test, export. See ``--help`` and
mnist_tutorial/runner.py; exit codes: 0 success, 1 a step failed, 2 bad usage or parameters.
"""
import sys

from mnist_tutorial.runner import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Run the MNIST notebooks with papermill: ``python run_all.py [-f PARAMS.yaml] [-p KEY VALUE]``.

A thin wrapper over ``pipeline.cli.main`` (also installed as ``caffe2torch-pipeline``); see
``--help``. Exit codes: 0 success, 1 a step failed, 2 bad usage or parameters, 130 interrupted,
143 terminated (SIGTERM).
"""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())

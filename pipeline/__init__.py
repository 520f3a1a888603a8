"""The notebook pipeline: runs notebooks/NN_<step>.ipynb with papermill into <outputs>/<run-id>/.

It never imports the tutorial: parameters come from the notebooks' ``parameters`` cells
(``pipeline.params``), kernels from the ``caffe2torch`` kernelspec (``pipeline.kernelfork``).
"""

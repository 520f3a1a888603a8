"""The Caffe2 MNIST tutorial's steps as importable code: data, model, training, notebooks."""

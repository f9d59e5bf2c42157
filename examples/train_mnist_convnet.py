"""The Keras "mnist_convnet" example in graphc: Conv2D(32, 3x3, relu) - MaxPool 2 - Conv2D(64, 3x3, relu) -
MaxPool 2 - Flatten - Dropout(0.5) - Dense(10, softmax); Adam, batch 128, 5 epochs.

    python examples/train_mnist_convnet.py                       # the embedded 5k subset (4,000 / 1,000)
    python examples/train_mnist_convnet.py --data mnist:DIR      # full MNIST: Keras reports ~99% test accuracy

DIR holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte (each may be .gz). Every `graphc train` option works here.
"""
import sys

from _train_common import run_example

if __name__ == "__main__":
    sys.exit(run_example("mnist_convnet", __doc__, epochs=5, batch=128, optimizer="adam"))

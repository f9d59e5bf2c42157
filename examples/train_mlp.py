"""The course's 3-layer MLP: 784-16-16-10 with ReLU and softmax (about 97.5% on full MNIST in 5 epochs).

    python examples/train_mlp.py                       # the embedded 5k subset (4,000 / 1,000)
    python examples/train_mlp.py --data mnist:DIR      # full MNIST from the four IDX files in DIR

Every `graphc train` option works here (--optimizer sgd --lr 0.1, --backend reference, ...).
"""
import sys

from _train_common import run_example

if __name__ == "__main__":
    sys.exit(run_example("mlp", __doc__, epochs=5, batch=32, optimizer="adam"))

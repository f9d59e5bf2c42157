"""LeNet-5 on MNIST digits: conv 6@5x5 pad 2 - pool - conv 16@5x5 - pool - 120 - 84 - 10.

    python examples/train_lenet5.py                        # the embedded 5k subset (4,000 / 1,000)
    python examples/train_lenet5.py --data mnist:DIR       # full MNIST from the four IDX files in DIR
    python examples/train_lenet5.py --epochs 10 --optimizer momentum --save lenet5.npz

The same as `graphc train lenet5 --epochs 5 --batch 128 --optimizer adam`; every `graphc train` option
works here (--backend reference, --seed, --resume, ...). Prints a confusion matrix at the end.
"""
import sys

from _train_common import run_example

if __name__ == "__main__":
    sys.exit(run_example("lenet5", __doc__, epochs=5, batch=128, optimizer="adam"))

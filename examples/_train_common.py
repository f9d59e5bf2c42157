"""Shared by the train_*.py examples: the `graphc train` options, training, then a confusion matrix."""
import argparse
import sys

import graphc as gc
from graphc.errors import GraphError
from graphc.infer import confusion_matrix, format_confusion_matrix
from graphc.train import add_train_arguments, train_from_args


def run_example(model, doc, **defaults):
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser, model=False)       # every `graphc train` option, --plots DIR among them
    parser.set_defaults(**defaults)
    args = parser.parse_args()
    try:
        result = train_from_args(args, model=model)
        ds = gc.data.load_dataset(result.config["data"])
        classes, _ = gc.infer.predict(result, ds.x_test)
        print("\nconfusion matrix on the test set (rows: true digit, columns: predicted):")
        print(format_confusion_matrix(confusion_matrix(ds.y_test, classes)))
    except GraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0

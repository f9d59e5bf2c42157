"""Shared by the train_*.py examples: the `graphc train` options, training, then a confusion matrix."""
import argparse
import sys

from graphc import data as gdata
from graphc.errors import GraphError
from graphc.infer import confusion_matrix, format_confusion_matrix, plot_loss_curve, plot_misclassified, predict
from graphc.train import add_train_arguments, train


def run_example(model, doc, **defaults):
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser, model=False)
    parser.add_argument("--plots", metavar="PREFIX", default=None,
                        help="also save PREFIX-loss.png and PREFIX-misclassified.png (needs matplotlib)")
    parser.set_defaults(**defaults)
    args = parser.parse_args()
    try:
        result = train(model, data=args.data, epochs=args.epochs, batch=args.batch, optimizer=args.optimizer,
                       lr=args.lr, backend=args.backend, seed=args.seed, save=args.save, resume=args.resume,
                       progress=args.progress)
        ds = gdata.load_dataset(result.config["data"])
        classes, _ = predict(result, ds.x_test)
        print("\nconfusion matrix on the test set (rows: true digit, columns: predicted):")
        print(format_confusion_matrix(confusion_matrix(ds.y_test, classes)))
        if args.plots:
            print("saved", plot_loss_curve(result, f"{args.plots}-loss.png"))
            print("saved", plot_misclassified(ds.x_test, ds.y_test, classes, f"{args.plots}-misclassified.png"))
    except GraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0

"""The paper's Figure 2: test error vs epoch of each method, mean over seeds with a min-max band.

    python tools/plot.py logs --out figure2.png
    python tools/plot.py 'logs/*mobilenet*' --out mobilenet.pdf
    python tools/plot.py 'logs/*mobilenet*' --batchstats --out figure2_batchstats.png

Reads and groups logs as tools/summarize.py does: a row of panels per row of its table, net 1 on
the left, net 2 on the right, one curve per method, each seed once; the panels' titles name the
dataset and --subset. Unfinished runs are drawn as far as they got. The format follows
--out: .png, .pdf, .svg, or any other of matplotlib's. Needs matplotlib (`pip install -r requirements-tools.txt`).
"""
import argparse
import json
import sys

import numpy as np

from common import ToolError, import_optional, one_line_errors
from paper import display_name
from summarize import (accuracy_key, check_batchstats, group_rows, load_runs, method_header, method_order,
                       one_run_per_seed, split_options)

PANEL_SIZE = (6.0, 4.0)  # inches, one network of one row
MARKED_EPOCHS = 20


def error_curve(runs, key):
    """(epochs, mean, min, max) of 100 - accuracy over the runs that logged each epoch."""
    by_epoch = {}
    for run in runs:
        for record in run.records:
            if key in record:
                by_epoch.setdefault(record["epoch"], []).append(100 - record[key])
    epochs = sorted(by_epoch)
    return np.array(epochs), *(np.array([reduce(by_epoch[epoch]) for epoch in epochs])
                               for reduce in (np.mean, np.min, np.max))


def panel_title(options, net_names, net, varying):
    """'WRN-16-1 (net 1) with MobileNet' and, below, what it was trained on (the dataset and
    --subset, which every figure says: a FashionMNIST curve must not pass for a CIFAR one) and the
    other settings that differ between the figure's rows."""
    partner = display_name(net_names[2 - net])
    data = f"{options['dataset']}, " + (f"subset {options['subset']}" if options.get("subset") else
                                        "all training images")
    settings = "".join(f", {key} {options.get(key)}" for key in varying if key not in ("dataset", "subset"))
    return f"{display_name(net_names[net - 1])} (net {net}) with {partner}\n{data}{settings}"


def draw(pyplot, runs, opt):
    """(the figure: a row of two panels (net 1, net 2) per row of the table, the notes on
    repeated seeds)."""
    groups = group_rows(runs)
    notes = []
    varying, _ = split_options([json.loads(row_key) for row_key in groups])
    figure, axes = pyplot.subplots(len(groups), 2, squeeze=False,
                                   figsize=(2 * PANEL_SIZE[0], len(groups) * PANEL_SIZE[1]))
    for row_axes, methods in zip(axes, groups.values()):
        some_run = next(iter(methods.values()))[0]
        curves = {}
        for method in sorted(methods, key=method_order):
            curves[method], _, seed_notes = one_run_per_seed(methods[method], some_run.net_names, method)
            notes += seed_notes
        for net, ax in zip((1, 2), row_axes):
            for method, method_runs in curves.items():
                # One key for the whole row: it depends on the networks only.
                epochs, mean, low, high = error_curve(method_runs, accuracy_key(some_run, net, opt.batchstats))
                # Markers only on short curves, where a single epoch would otherwise draw nothing.
                line, = ax.plot(epochs, mean, marker="o" if len(epochs) <= MARKED_EPOCHS else None,
                                label=f"{method_header(method)} (n={len(method_runs)})")
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_title(panel_title(some_run.row_options, some_run.net_names, net, varying), fontsize=10)
            ax.set_xlabel("epoch")
            ax.locator_params(axis="x", integer=True)
            ax.set_ylabel("test error (%)")
            ax.grid(alpha=0.3)
            ax.legend()
    figure.tight_layout()
    return figure, notes


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("logs", nargs="+", help="log files, folders holding log.txt files, or globs")
    parser.add_argument("--out", default="figure2.png", help="the figure file: .png, .pdf, .svg, ...")
    parser.add_argument("--batchstats", action="store_true",
                        help="MobileNet's error with BN using test-batch statistics, as summarize.py --batchstats")
    return parser.parse_args(argv)


@one_line_errors
def main(argv=None):
    opt = parse_options(argv)
    import_optional("matplotlib", "plot.py").use("Agg")  # files only: no display needed
    import matplotlib.pyplot as pyplot
    runs = load_runs(opt.logs)
    if opt.batchstats:
        check_batchstats(runs)
    figure, notes = draw(pyplot, runs, opt)
    try:
        figure.savefig(opt.out, dpi=150)
    except (OSError, ValueError) as error:  # ValueError: a format matplotlib does not write
        raise ToolError(f"--out {opt.out}: {error}") from None
    pyplot.close(figure)
    print(f"wrote {opt.out}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's table from a set of runs: test error of each network as mean +/- std over seeds.

    python tools/summarize.py logs                              # every log.txt under logs/
    python tools/summarize.py 'logs/*_seed1' 'logs/*_seed2'    # globs
    python tools/summarize.py logs --csv > table.csv            # one line per cell, plain numbers
    python tools/summarize.py 'logs/*mobilenet*' --batchstats   # the MobileNet's published-protocol line first
    python tools/summarize.py logs --ensemble                   # and the pair as an ensemble

A row is a pair of networks (as the runs logged them) with its settings: every logged option of
main.py but those that do not change what is trained (listed below). A column pair is a method (dcm-LINKS:
dcm with other --links), net 1's and net 2's error after the last epoch (the paper's protocol),
mean +/- sample std over seeds, each seed counted once (the run that got furthest); unfinished runs
are left out, and counted in their cell. The paper's values (tools/paper.py) are set below a row only
where its recipe and its measure are the paper's. Notes go to stderr, the table to stdout; the whole
story: docs/reproducing.md.
"""
import argparse
import csv
import glob
import io
import itertools
import json
import os
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

import paper
from common import (FOLDERS, LOG_NAME, METHODS, ROOT, ToolError, bookkeeping_options, markdown_table, one_line_errors,
                    read_records, run_options)

# Keys of a line of main.py that this tool reads; the published code's logs lack most of them.
REQUIRED_KEYS = ("epoch", "epochs", "method", "links", "seed", "dataset", "depth", "width", "architecture", "net1",
                 "net2", "test_acc_net1", "test_acc_net2")
ENSEMBLE = "ensemble"  # the column of the pair's ensemble, next to net 1 and net 2
ENSEMBLE_KEY = "test_acc_ensemble"
METHOD_HEADERS = {"ind": "Ind", "dml": "DML", "ds": "DS", "dcm": "DCM"}


@dataclass
class Run:
    """One training run: its log's records, in order, and what identifies its cell."""
    path: str
    records: list

    last = property(lambda self: self.records[-1])

    @property
    def finished(self):
        return self.last["epoch"] == self.last["epochs"]

    @property
    def seed(self):
        return self.last["seed"]

    @property
    def net_names(self):
        """(net 1, net 2) as the run logged them (models.pair_names)."""
        return self.last["net1"], self.last["net2"]

    @property
    def method(self):
        """The column: the method, with its --links when they are not the default dense ones."""
        links = self.last["links"]
        return self.last["method"] if links == "dense" else f"{self.last['method']}-{links}"

    @property
    def row_options(self):
        """The options that define the run's row (the pair's names included): all of the cell's
        (common.run_options) but the method and links."""
        return {key: value for key, value in run_options(self.last).items() if key not in ("method", "links")}


# --- reading logs ------------------------------------------------------------------------------------

def find_logs(paths):
    """The log files named by `paths`: files as given, folders searched for log.txt, globs expanded."""
    logs = []
    for path in paths:
        matches = sorted(glob.glob(path, recursive=True)) or ([path] if os.path.exists(path) else [])
        if not matches:
            raise ToolError(f"{path}: no such file or folder, and no match as a glob{runs_elsewhere()}")
        for match in matches:
            if os.path.isdir(match):
                logs += sorted(os.path.join(folder, LOG_NAME) for folder, _, files in os.walk(match)
                               if LOG_NAME in files)
            else:
                logs.append(match)
    unique = list(dict.fromkeys(os.path.normpath(log) for log in logs))
    if not unique:  # a run writes log.txt at the end of each epoch
        raise ToolError(f"no {LOG_NAME} under {' '.join(paths)}: no run there has finished an epoch"
                        f"{runs_elsewhere()}")
    return unique


def runs_elsewhere():
    """Where runs may be when none is where the user looked: main.py started inside wrn/ or
    wrn_mobi/ without --save writes to that folder's logs/, not to the top folder's. '' when
    neither holds a log."""
    folders = [ROOT / folder / "logs" for folder in FOLDERS]
    counts = {folder: sum(LOG_NAME in files for _, _, files in os.walk(folder)) for folder in folders}
    found = [f"{os.path.relpath(folder)} ({count} {LOG_NAME})" for folder, count in counts.items() if count]
    if not found:
        return ""
    return (f"; runs started inside wrn/ or wrn_mobi/ without --save are in that folder's logs/: "
            f"{', '.join(found)}")


def read_log(path):
    """The json_stats records of one log.txt of a training folder's main.py."""
    records = read_records(path)
    missing = [key for key in REQUIRED_KEYS if key not in records[-1]]
    if missing:
        raise ToolError(f"{path} lacks {', '.join(missing)}: it was not written by this repository's main.py "
                        f"(the published code's logs hold neither --method nor net 2's accuracy)")
    return records


def load_runs(paths):
    return [Run(log, read_log(log)) for log in find_logs(paths)]


# --- the table ---------------------------------------------------------------------------------------

@dataclass
class Cell:
    """One network of one method in one row: the error and seed of each run counted."""
    errors: list
    seeds: list
    unfinished: int  # unfinished runs of the cell, left out of `errors`
    protocol: str = "eval"  # how the errors were measured: a key of paper.PROTOCOLS
    paper: tuple = None  # (mean, std) reported in the paper, where it measured this cell the same way
    repeated: int = 0  # runs left out because another run of their seed is counted

    @property
    def mean(self):
        return float(np.mean(self.errors)) if self.errors else None

    @property
    def std(self):
        return float(np.std(self.errors, ddof=1)) if len(self.errors) > 1 else None

    @property
    def difference(self):
        return self.mean - self.paper[0] if self.paper and self.errors else None


@dataclass
class Row:
    net_names: tuple
    options: dict  # the row's options (the networks' names included)
    cells: dict  # (method, net index 1 or 2) -> Cell, the "ours" line
    other_cells: dict  # (method, net) -> the Cell under the other protocol, where the runs logged both
    paper_note: str = ""  # why the row has no paper values although the paper has the networks

    def paper_cell(self, key):
        """The cell of ours that the paper's value of `key` is set beside, or None."""
        return next((cell for cell in (self.cells.get(key), self.other_cells.get(key)) if cell and cell.paper), None)


def accuracy_key(run, net, batchstats):
    """The logged accuracy of network `net` (1 or 2) of `run` that the "ours" line (and plot.py) uses:
    with --batchstats, the published protocol's where the run logged it."""
    return protocol_key(net, "batchstats" if batchstats and protocol_key(net, "batchstats") in run.last else "eval")


def protocol_key(net, protocol):
    """The logged accuracy of network `net` (1, 2 or ENSEMBLE) measured by `protocol`."""
    if net == ENSEMBLE:
        return ENSEMBLE_KEY
    return f"test_acc_net{net}" + ("_batchstats" if protocol == "batchstats" else "")


def group_rows(runs):
    """{row key (the row's options as JSON): {method: [runs]}}, rows in the paper's order."""
    groups = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[json.dumps(run.row_options, sort_keys=True)][run.method].append(run)

    def row_order(item):
        options = json.loads(item[0])
        return options["depth"], options["width"], options["architecture"], item[0]

    return dict(sorted(groups.items(), key=row_order))


def method_order(method):
    return (METHODS.index(method), "") if method in METHODS else (len(METHODS), method)


def tabulate(runs, batchstats=False, ensemble=False):
    """The rows of the table, and the notes to print below it; `ensemble` adds the pair's ensemble
    to the networks of each method."""
    rows, notes, counted_runs = [], [], []
    for row_key, methods in group_rows(runs).items():
        options = json.loads(row_key)
        net_names = next(iter(methods.values()))[0].net_names
        cells, other_cells = {}, {}
        for method in sorted(methods, key=method_order):
            method_runs, repeated, seed_notes = one_run_per_seed(methods[method], net_names, method)
            notes += seed_notes
            counted_runs += method_runs
            for net in (1, 2, ENSEMBLE) if ensemble else (1, 2):
                # A network whose runs logged the published protocol too is measured both ways;
                # --batchstats makes that its "ours" line.
                protocols = ["eval"] + (["batchstats"] if net != ENSEMBLE and logged_both(methods, net) else [])
                if batchstats:
                    protocols.reverse()
                for index, protocol in enumerate(protocols):
                    cell, missing = measure_cell(method_runs, net, protocol)
                    cell.repeated = repeated
                    compared = net != ENSEMBLE and protocol == paper.protocol(net_names[net - 1])
                    paper_value = paper.value(options, method, net) if compared else None
                    cell.paper = paper_value if cell.errors else None
                    (other_cells if index else cells)[method, net] = cell
                    if index == 0 or paper_value:  # the "ours" line, or the one the paper is compared with
                        notes += [f"{path} lacks {key}: left out of {method} net {net}" for path, key in missing]
        reasons = paper.recipe_differences(options) if net_names in paper.TABLE else []
        paper_note = f"not comparable: {'; '.join(reasons)}" if reasons else ""
        rows.append(Row(net_names, options, cells, other_cells, paper_note))
        if reasons:
            notes.append(f"{' + '.join(map(paper.display_name, net_names))}: no paper values beside a row whose recipe "
                         f"is not the paper's: {'; '.join(reasons)}")
    notes += [f"unfinished, left out: {run.path} (epoch {run.last['epoch']} of {run.last['epochs']})"
              for run in counted_runs if not run.finished]
    return rows, notes


def logged_both(methods, net):
    """Whether a run of the row ({method: [runs]}) logged network `net`'s accuracy under the
    published protocol too (wrn_mobi's MobileNet)."""
    return any(protocol_key(net, "batchstats") in run.last for runs in methods.values() for run in runs)


def measure_cell(method_runs, net, protocol="eval"):
    """The Cell of network `net` measured by `protocol` over the finished runs of one method, and
    (log, key) of the runs whose log lacks the accuracy the cell needs."""
    key = protocol_key(net, protocol)
    finished = [run for run in method_runs if run.finished]
    counted = [run for run in finished if key in run.last]
    return (Cell([100 - run.last[key] for run in counted], [run.seed for run in counted],
                 len(method_runs) - len(finished), protocol),
            [(run.path, key) for run in finished if key not in run.last])


def one_run_per_seed(method_runs, net_names, method):
    """(one run per seed, in order of seed; how many runs were left out; a note per repeated seed,
    naming the pair and the method) of the runs of one cell. Two logs of one seed are usually one
    run found twice (a copied folder, a --resume PATH into another folder) or a rerun of it: counted
    as two seeds they would shrink the std. The run that logged the furthest epoch is kept, among
    equals the first by path."""
    ordered = sorted(method_runs, key=lambda run: (run.seed, -run.last["epoch"], run.path))
    kept, notes = [], []
    for seed, runs in itertools.groupby(ordered, key=lambda run: run.seed):
        first, *others = runs
        kept.append(first)
        if others:
            notes.append(f"{' + '.join(map(paper.display_name, net_names))} {method}: seed {seed} has "
                         f"{1 + len(others)} runs in one cell, counted once, from the one that got furthest (the first by path "
                         f"among equals): {first.path} (epoch {first.last['epoch']}); left out: "
                         + ", ".join(f"{run.path} (epoch {run.last['epoch']})" for run in others))
    return kept, len(method_runs) - len(kept), notes


# --- output ------------------------------------------------------------------------------------------

def method_header(method):
    name, _, links = method.partition("-")
    return METHOD_HEADERS.get(name, name) + (f"-{links}" if links else "")


def split_options(row_options):
    """(names of the options that differ between rows, {name: value} of those shared by all), from
    each row's options. The pair's keys are left out: the networks' names show them."""
    names = sorted({key for options in row_options for key in options} - set(paper.PAIR_KEYS))
    varying = [key for key in names if len({json.dumps(options.get(key)) for options in row_options}) > 1]
    shared = {key: row_options[0][key] for key in names if key not in varying}
    return varying, shared


def cell_text(cell):
    """'16.70 ± 0.20 (n=5)'; '(n=4, +1 unfinished)' when unfinished runs are left out, '(n=5, +1
    repeated seed)' when a run of a counted seed is left out."""
    if cell is None:
        return ""
    value = "-"
    if cell.errors:
        value = f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "")
    counts = f"n={len(cell.errors)}"
    if cell.unfinished:
        counts += f", +{cell.unfinished} unfinished"
    if cell.repeated:
        counts += f", +{cell.repeated} repeated seed"
    return f"{value} ({counts})"


def table_lines(rows):
    """The table as lists of cell texts (header first; per row ours, for a MobileNet ours under the
    other protocol, then the paper's and the difference where the paper measured the cell as we
    did, or why the paper's values are left out)."""
    methods = sorted({method for row in rows for method, _ in row.cells}, key=method_order)
    varying, _ = split_options([row.options for row in rows])
    nets = (1, 2, ENSEMBLE) if any(net == ENSEMBLE for row in rows for _, net in row.cells) else (1, 2)
    keys = [(method, net) for method in methods for net in nets]
    labelled = any(row.other_cells or row.paper_note or any(map(row.paper_cell, keys)) for row in rows)
    lines = [["Net 1", "Net 2", *varying, *([""] if labelled else [])]
             + [f"{method_header(method)} {net}" for method, net in keys]]
    for row in rows:
        label = [paper.display_name(row.net_names[0]), paper.display_name(row.net_names[1]),
                 *(str(row.options.get(key, "")) for key in varying)]
        blank = [""] * len(label)
        lines.append(label + (["ours"] if labelled else []) + [cell_text(row.cells.get(key)) for key in keys])
        if row.other_cells:
            protocol = next(iter(row.other_cells.values())).protocol
            lines.append(blank + [f"ours, {paper.PROTOCOLS[protocol]}"] + [cell_text(row.other_cells.get(key))
                                                                          for key in keys])
        compared = [row.paper_cell(key) for key in keys]
        if any(compared):
            lines.append(blank + ["paper"] + [f"{cell.paper[0]:.2f} ± {cell.paper[1]:.2f}" if cell else ""
                                              for cell in compared])
            lines.append(blank + ["ours - paper"] + [f"{cell.difference:+.2f}" if cell else "" for cell in compared])
        elif row.paper_note:
            lines.append(blank + ["paper"] + [row.paper_note] + [""] * (len(keys) - 1))
    return lines


def title(rows, batchstats):
    _, shared = split_options([row.options for row in rows])
    lines = ["Test error (%) of each network's final classifier at the last epoch: mean ± sample std over seeds, "
             "n = seeds, one run each."]
    # The networks measured both ways, as their runs logged them (wrn_mobi's MobileNet, net 2).
    for net, name, folder in sorted({(net, row.net_names[net - 1], row.options["architecture"])
                                     for row in rows for _, net in row.other_cells}):
        first, second = ("batchstats", "eval") if batchstats else ("eval", "batchstats")
        measured = {"eval": f"BN in eval mode (the proper measurement, {protocol_key(net, 'eval')})",
                    "batchstats": f"BN normalising each test batch by its own statistics "
                                  f"({protocol_key(net, 'batchstats')}), as the published {folder} tested it"}
        compared = "'ours'" if batchstats else f"'ours, {paper.PROTOCOLS['batchstats']}'"
        lines.append(f"{paper.display_name(name)} (net {net}): 'ours' is its error with {measured[first]}; 'ours, "
                     f"{paper.PROTOCOLS[second]}' with {measured[second]}. The paper's {paper.display_name(name)} "
                     f"values come from the published {folder}: they are set beside, and differenced against, the "
                     f"{compared} line.")
    if any(net == ENSEMBLE for row in rows for _, net in row.cells):
        lines.append(f"{ENSEMBLE}: the two networks' final classifiers with their softmax averaged ({ENSEMBLE_KEY}).")
    lines.append("Settings of every row: " + ", ".join(f"{key} {value}" for key, value in shared.items()) + ".")
    return lines


def markdown(rows, batchstats):
    lines = table_lines(rows)
    return "\n".join(title(rows, batchstats) + [""] + markdown_table(lines[0], lines[1:]))


def csv_text(rows):
    """One line per cell with plain numbers, for scripts and spreadsheets."""
    option_names = sorted({key for row in rows for key in row.options} - {"net1", "net2"})
    columns = ["net1", "net2", *option_names, "method", "net", "network", "protocol", "runs", "unfinished", "repeated",
               "mean", "std", "paper_mean", "paper_std", "difference", "paper_note", "seeds"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        for (method, net), cell in [*row.cells.items(), *row.other_cells.items()]:
            writer.writerow({"net1": row.net_names[0], "net2": row.net_names[1],
                             **{key: row.options.get(key, "") for key in option_names},
                             "method": method, "net": net,
                             "network": "+".join(row.net_names) if net == ENSEMBLE else row.net_names[net - 1],
                             "protocol": cell.protocol, "paper_note": row.paper_note,
                             "runs": len(cell.errors), "unfinished": cell.unfinished, "repeated": cell.repeated,
                             "mean": cell.mean, "std": cell.std,  # None is written as an empty field
                             "paper_mean": cell.paper[0] if cell.paper else "",
                             "paper_std": cell.paper[1] if cell.paper else "",
                             "difference": cell.difference,
                             "seeds": " ".join(map(str, cell.seeds))})
    return buffer.getvalue().rstrip("\n")


# --- command line ------------------------------------------------------------------------------------

def parse_options(argv=None):
    ignored = textwrap.fill("Options that do not define a cell (runs differing only in them share it): "
                            + ", ".join(bookkeeping_options()) + ".", width=95)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1] + "\n" + ignored)
    parser.add_argument("logs", nargs="+", help="log files, folders holding log.txt files, or globs")
    parser.add_argument("--batchstats", action="store_true",
                        help="the 'ours' line from test_acc_net2_batchstats, the MobileNet's error with test-batch BN "
                             "statistics (the published code's protocol), the eval-mode one second")
    parser.add_argument("--ensemble", action="store_true",
                        help=f"a column per method: the pair as an ensemble (final softmax averaged, {ENSEMBLE_KEY})")
    parser.add_argument("--csv", action="store_true", help="CSV, one line per cell, instead of Markdown")
    return parser.parse_args(argv)


def check_batchstats(runs):
    if not any(protocol_key(net, "batchstats") in run.last for run in runs for net in (1, 2)):
        raise ToolError(f"--batchstats: none of the {len(runs)} logs holds {protocol_key(2, 'batchstats')} "
                        f"(wrn_mobi/main.py logs it for its MobileNet, wrn/ runs do not); drop --batchstats")


@one_line_errors
def main(argv=None):
    opt = parse_options(argv)
    runs = load_runs(opt.logs)
    if opt.batchstats:
        check_batchstats(runs)
    rows, notes = tabulate(runs, opt.batchstats, opt.ensemble)
    # flushed before the notes on stderr, also when both go to one pipe
    print(csv_text(rows) if opt.csv else markdown(rows, opt.batchstats), flush=True)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the tools share: the training folders, importing one, reading a run's log, a setting's flags.

A training folder (wrn/, wrn_mobi/: a copy of wrn/ with its own models.py) is registered once, in
FOLDERS. Everything else a tool needs to know about a run (its folder, its networks' names, its
options) is read off its log.txt, where main.py writes it.
"""
import functools
import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("wrn", "wrn_mobi")  # the training folders, each a pair of networks: a new one is added here
# The sweep's methods, in the table's order; dcm-LINKS is dcm with --links LINKS.
METHODS = ("ind", "dml", "ds", "dcm", "dcm-same", "dcm-cross", "dcm-final")
LOG_NAME = "log.txt"
LOG_PREFIX = "json_stats: "


class ToolError(Exception):
    """A problem the user can fix (a path, a foreign file, a flag): one message, exit code 2."""


def one_line_errors(main):
    """A tool's main(argv) that prints a ToolError as one line 'error: ...' on stderr and returns 2."""
    @functools.wraps(main)
    def checked_main(argv=None):
        try:
            return main(argv)
        except ToolError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return checked_main


def import_optional(name, needed_by):
    """The optional package `name` (requirements-tools.txt), or a ToolError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ToolError(f"{needed_by} needs {name}, which is not installed: pip install -r requirements-tools.txt "
                        f"(or pip install {name})") from None


@functools.cache
def load_folder(folder):
    """The modules of a training folder as a namespace (.models, .main, .training, ...), imported
    from ROOT/folder. They import each other by plain name (`import models`), so while they load the
    folder leads sys.path and those names are free in sys.modules; sys.modules is restored after, so
    that several folders can be used in one process."""
    path = ROOT / folder
    names = sorted(file.stem for file in path.glob("*.py"))
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    sys.path.insert(0, str(path))
    try:
        return SimpleNamespace(**{name: importlib.import_module(name) for name in names})
    finally:
        sys.path.remove(str(path))
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


# Options a checkpoint may be resumed with (checkpoint.RESUMABLE_OPTIONS) that still change what
# is trained: its length and its numerics.
RESUMABLE_BUT_TRAINED = ("epochs", "amp", "tf32", "sync_bn")
# What a log line names besides main.py's options that defines the run: the pair, and how many
# processes shared each batch (BN's statistics without --sync_bn).
RUN_KEYS = ("architecture", "net1", "net2", "world_size")


@functools.cache
def main_defaults():
    """{option: default} of main.py's parser (options.py, the same file in every folder). The
    defaults are the paper's recipe: a run of main.py without flags is the paper's setup."""
    return vars(load_folder(FOLDERS[0]).options.option_parser().parse_args([]))


@functools.cache
def bookkeeping_options():
    """main.py's options that do not change what is trained, so that runs differing only in them
    share a table cell and a sweep folder name: the seed, and the options a checkpoint may be
    resumed with (checkpoint.RESUMABLE_OPTIONS: files, threads, speed) but RESUMABLE_BUT_TRAINED.
    Any other option, one added to main.py later included, defines what is trained."""
    resumable = load_folder(FOLDERS[0]).checkpoint.RESUMABLE_OPTIONS
    return ("seed", *(name for name in resumable if name not in RESUMABLE_BUT_TRAINED))


def run_options(record):
    """What defines the run of a log line: every option main.py logged but the bookkeeping ones,
    and RUN_KEYS; the values as option_value compares them."""
    return {key: option_value(value) for key, value in record.items()
            if key in RUN_KEYS or (key in main_defaults() and key not in bookkeeping_options())}


def read_records(path):
    """The json_stats records of a log.txt of main.py, in order; ToolError for anything else."""
    try:
        with open(path, encoding="utf-8") as log:
            lines = log.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ToolError(f"{path} is not a readable text file ({type(error).__name__}); "
                        f"give the {LOG_NAME} of a run") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.startswith(LOG_PREFIX):
            raise ToolError(f"{path}, line {number}: not a '{LOG_PREFIX}{{...}}' line; "
                            f"give the {LOG_NAME} written by a training folder's main.py")
        try:
            records.append(json.loads(line[len(LOG_PREFIX):]))
        except json.JSONDecodeError:
            raise ToolError(f"{path}, line {number}: the JSON is cut off or malformed; "
                            f"repair or remove that line") from None
    if not records:
        raise ToolError(f"{path} holds no epoch; give the {LOG_NAME} of a run that finished one")
    return records


def option_value(value):
    """An option's value as it is compared: a list given as JSON text ('[60, 120, 160]',
    '[60,120,160]') as the list, anything else as logged (JSON numbers are compared as numbers).
    main.py has refused any such text that is not JSON before a run logs it."""
    return json.loads(value) if isinstance(value, str) and value.startswith("[") else value


def markdown_table(header, rows):
    """The lines of a Markdown table: the header, the separator, a line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |"
                                                                             for row in rows]


def setting_flags(setting):
    """main.py's flags of a speed setting such as 'bf16+cl+compile': the number format first (fp32:
    IEEE fp32, tf32: fp32 on TF32 cores, bf16 or fp16: autocast), then cl (--channels_last) and
    compile (--compile)."""
    dtype, *extras = setting.split("+")
    return ((["--amp", dtype] if dtype in ("bf16", "fp16") else []) + (["--tf32"] if dtype == "tf32" else [])
            + (["--channels_last"] if "cl" in extras else []) + (["--compile"] if "compile" in extras else []))

"""The paper's facts (Yao & Sun, ECCV 2020, SPEC section 6): its table, its recipe, how it tested.

Networks are named as models.pair_names names them and main.py logs them (net1, net2).
"""
import json

from common import main_defaults, option_value

# The paper's Table (CIFAR-100 test error %, mean, std of 5 runs):
# (net 1, net 2) -> method -> ((net 1 mean, std), (net 2 mean, std)).
TABLE = {
    ("wrn-28-10", "wrn-28-10"): {"ind": ((18.72, 0.24), (18.72, 0.24)), "dml": ((17.89, 0.26), (17.95, 0.07)),
                                 "dcm": ((16.61, 0.24), (16.65, 0.22))},
    ("wrn-28-10", "mobilenet"): {"ind": ((18.72, 0.24), (26.30, 0.35)), "dml": ((17.24, 0.13), (23.91, 0.22)),
                                 "dcm": ((16.83, 0.07), (21.43, 0.20))},
}
# The paper's numbers are comparable only with runs of its recipe, which is main.py's defaults
# (common.main_defaults): a row whose options hold any other value, one of an option added later
# included, is kept away from the paper's values.
# BN's statistics in the paper are those of the whole batch of 128 on one GPU: one process
# (world_size 1), or any number with --sync_bn, which computes them over the global batch.
BN_BATCH_OPTIONS = ("world_size", "sync_bn")
# The row's own keys: which networks it is, not how they were trained.
PAIR_KEYS = ("architecture", "net1", "net2", "depth", "width")
# How a network's test error is measured: the key of its accuracy in a log line, and its words.
# The published wrn_mobi never switched its MobileNet to eval mode, so the paper's MobileNet values
# were measured with test-batch BN statistics; main.py logs that too (test_acc_net2_batchstats).
PROTOCOLS = {"eval": "BN in eval mode", "batchstats": "test-batch BN (published protocol)"}
PUBLISHED_PROTOCOL = {"mobilenet": "batchstats"}  # every other network: "eval"
DISPLAY_NAMES = {"mobilenet": "MobileNet"}  # every other network: its name in capitals, WRN-28-10


def display_name(net_name):
    """The paper's spelling: WRN-28-10, MobileNet."""
    return DISPLAY_NAMES.get(net_name, net_name.upper())


def protocol(net_name):
    """How the paper measured a network's error: a key of PROTOCOLS."""
    return PUBLISHED_PROTOCOL.get(net_name, "eval")


def recipe_differences(row_options):
    """Why a row's recipe is not the paper's, as phrases ([] when it is): the options whose value
    differs from main.py's default, and BN statistics of less than the whole batch."""
    defaults = main_defaults()
    reasons = [f"{key} {json.dumps(value)} (the paper's: {json.dumps(option_value(defaults[key]))})"
               for key, value in row_options.items() if key in defaults and key not in PAIR_KEYS + BN_BATCH_OPTIONS
               and value != option_value(defaults[key])]
    world_size, sync_bn = row_options.get("world_size", 1), row_options.get("sync_bn", False)
    if world_size != 1 and sync_bn is not True:
        reasons.append(f"world_size {world_size} without sync_bn (BN statistics of each process's slice, the "
                       f"paper's: of the whole batch)")
    return reasons


def value(row_options, method, net):
    """The paper's (mean, std) of network `net` (1 or 2) of `method` in a row, or None where it has
    none or the row's recipe is not the paper's."""
    pair = (row_options["net1"], row_options["net2"])
    if method not in TABLE.get(pair, {}) or recipe_differences(row_options):
        return None
    return TABLE[pair][method][net - 1]

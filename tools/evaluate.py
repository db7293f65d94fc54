"""Test error, parameter count and forward GFLOP of exported networks (SAVE/net1.pt, SAVE/net2.pt).

    python tools/evaluate.py logs/wrn-28-10_mobilenet_dcm_seed1/net*.pt   # the run's dataset, from its --dataroot
    python tools/evaluate.py net1.pt --dataset CIFAR10 --dataroot DATA --gpu_id ''

Each file is read with torch.load(weights_only=True) and loaded, strictly, into the network its
weights describe: a WRN-d-k (depth, width and classes read off the tensors; wrn/models.py, whose
WRN code is identical to wrn_mobi's) or the MobileNet (wrn_mobi/models.py), built without
auxiliary classifiers. It is tested as main.py tested it at the run's last epoch: BN in eval mode,
the whole test set of the run's dataset normalised the same way, under the run's --amp autocast,
fp32 precision (--tf32: TF32 tensor cores on a GPU, else IEEE fp32) and memory layout
(--channels_last), all read off the log.txt beside the file, and read from the run's --dataroot
there. So the error is 100 - the test_acc_net1/net2 that main.py logged last,
and the test loss (cross-entropy of the network's final classifier) its test_loss_terms
ce_net1_final / ce_net2_final, whatever the number of processes (their BN statistics are rank
0's) or the resumes. A run trained with --compile is
evaluated eagerly: the same numbers up to float rounding. --dataset, --dataroot and --amp override
the log (without one: CIFAR100 in ./data, fp32). A relative --dataroot in the log is relative to
the folder the run was started in: started elsewhere, give --dataroot. A --dataroot that is no
folder is refused: nothing is downloaded there. GFLOP are 2 x multiply-adds of one 32x32 image's
forward pass (torch's FLOP counter).

Checkpoints (checkpoint.pt), networks that still carry auxiliary classifiers, and files of other
networks or datasets are refused with a message. Prints a Markdown table.
"""
import argparse
import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
AUX_PREFIXES = ("aux1.", "aux2.")  # where models.py keeps the auxiliary classifiers
WRN_BLOCK_KEY = "group0.{}.conv0.weight"  # one per block of group0: (depth - 4) / 6 of them
MOBILENET_KEY = "stem.0.weight"
IMAGE_SHAPE = (1, 3, 32, 32)
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # main.py's --amp (training.py)


class EvaluateError(Exception):
    """A file or option that cannot be evaluated: one message, exit code 2."""


@functools.lru_cache(maxsize=None)
def load_module(folder, name):
    """wrn/NAME.py or wrn_mobi/NAME.py under its own module name, so that both folders' models.py
    can be used in one process. The folder is on the path while it loads, for its own imports."""
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / folder))
    return module


# --- the network a file holds ----------------------------------------------------------------------

def read_weights(path):
    """The state dict of an exported network, refusing what is not one."""
    if not os.path.isfile(path):
        raise EvaluateError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, truncated, or holding objects weights_only refuses
        raise EvaluateError(f"{path} is not a file of tensors saved by main.py ({type(error).__name__}); "
                            f"give the net1.pt or net2.pt of a finished run") from None
    if isinstance(state, dict) and {"net1", "net2", "optimizer"} <= set(state):
        raise EvaluateError(f"{path} is a training checkpoint (both networks with auxiliary classifiers); "
                            f"give the net1.pt or net2.pt that the run exports when it finishes "
                            f"(finish it with main.py --resume)")
    if not (isinstance(state, dict) and state and all(isinstance(value, torch.Tensor) for value in state.values())):
        raise EvaluateError(f"{path} is not the state dict of a network; give the net1.pt or net2.pt of a run")
    aux_keys = [key for key in state if key.startswith(AUX_PREFIXES)]
    if aux_keys:
        raise EvaluateError(f"{path} holds auxiliary classifiers ({aux_keys[0]}, ...): it is not an exported "
                            f"network; give the net1.pt or net2.pt that main.py writes at the end of a run")
    return state


def describe(path, state):
    """(folder, name, architecture keyword arguments) of the network whose weights `state` holds."""
    if "head.fc.weight" not in state:
        raise EvaluateError(f"{path} holds no head.fc.weight: not a network of this repository")
    num_classes = state["head.fc.weight"].shape[0]
    if MOBILENET_KEY in state:
        return "wrn_mobi", "MobileNet", dict(num_classes=num_classes)
    if WRN_BLOCK_KEY.format(0) in state:
        blocks = 0
        while WRN_BLOCK_KEY.format(blocks) in state:
            blocks += 1
        depth, width = 6 * blocks + 4, state[WRN_BLOCK_KEY.format(0)].shape[0] // 16
        return "wrn", f"WRN-{depth}-{width}", dict(depth=depth, width=width, num_classes=num_classes)
    raise EvaluateError(f"{path} holds neither a WRN nor the MobileNet of this repository "
                        f"(first keys: {', '.join(list(state)[:3])})")


def build_network(path, state):
    """(name, the network with `state` loaded, strictly, and in eval mode, num_classes)."""
    folder, name, architecture = describe(path, state)
    models = load_module(folder, "models")
    network = (models.mobilenet(aux=False, **architecture) if folder == "wrn_mobi"
               else models.wrn(aux=False, **architecture))
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        detail = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise EvaluateError(f"{path} does not fit {name}: {detail}") from None
    return name, network.eval(), architecture["num_classes"]


# --- measurements ----------------------------------------------------------------------------------

def run_protocol(path, opt):
    """{dataset, dataroot, amp, tf32, channels_last} main.py tested the file's network with at its last
    epoch: the options of the last line of the log.txt beside it, --dataset, --dataroot and --amp
    overriding them, and `logged`: whether the dataroot is the log's."""
    protocol = {"dataset": "CIFAR100", "dataroot": "./data", "amp": "none", "tf32": False, "channels_last": False}
    logged = {}
    try:
        last = (Path(path).parent / "log.txt").read_text().splitlines()[-1]
        logged = json.loads(last[len("json_stats: "):])
        protocol.update({key: logged[key] for key in protocol if key in logged})
    except (OSError, IndexError, ValueError, TypeError):
        pass  # no log beside the file: the defaults, main.py's
    protocol.update({key: getattr(opt, key) for key in ("dataset", "dataroot", "amp") if getattr(opt, key)})
    protocol["logged"] = not opt.dataroot and "dataroot" in logged
    return protocol


def check_dataroot(path, protocol):
    """Refuse a dataroot that is no folder here, rather than download the dataset into it."""
    dataroot = protocol["dataroot"]
    if os.path.isdir(dataroot) or protocol["dataset"] == "synthetic":  # made in memory: no folder needed
        return
    if protocol["logged"]:
        relative = "" if os.path.isabs(dataroot) else " (relative to the folder the run was started in)"
        raise EvaluateError(f"{path}: the run's --dataroot {dataroot}{relative}, read off "
                            f"{Path(path).parent / 'log.txt'}, is no folder here; give the dataset's folder with "
                            f"--dataroot")
    raise EvaluateError(f"--dataroot {dataroot} is no folder; give the folder holding the run's dataset")


@torch.no_grad()
def test_measurements(network, dataset_module, data, batch_size, amp, channels_last):
    """(top-1 accuracy (%), mean cross-entropy) of the final classifier on the whole test set, as
    main.py measures them: under autocast to `amp`, the loss in fp32, summed per batch."""
    device = data.test_images.device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    network.to(memory_format=memory_format)
    correct, loss_sum = 0, torch.zeros((), device=device)
    for images, labels in dataset_module.test_batches(data, batch_size):
        with torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != "none"):
            logits = network(images.contiguous(memory_format=memory_format))[-1]
        correct += (logits.argmax(dim=1) == labels).sum().item()
        loss_sum += F.cross_entropy(logits.float(), labels) * labels.numel()
    return 100 * correct / len(data.test_labels), loss_sum.item() / len(data.test_labels)


@torch.no_grad()
def forward_gflop(network, device):
    # Imported here, once a file is measured: a CUDA torch without triton logs a warning at the import,
    # which would come before any of the tool's one-line errors.
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        network(torch.zeros(IMAGE_SHAPE, device=device))
    return counter.get_total_flops() / 1e9


def measure(path, opt, device, datasets):
    """{network, dataset, test_images, protocol, accuracy, loss, parameters, gflop} of one file;
    `datasets` caches each loaded dataset by (name, dataroot)."""
    state = read_weights(path)
    name, network, num_classes = build_network(path, state)
    dataset_module = load_module("wrn", "dataset")  # identical in both folders
    protocol = run_protocol(path, opt)
    dataset_name, dataroot = protocol["dataset"], protocol["dataroot"]
    check_dataroot(path, protocol)
    if (dataset_name, dataroot) not in datasets:
        try:
            datasets[dataset_name, dataroot] = dataset_module.load_dataset(dataset_name, dataroot, device)
        except dataset_module.DatasetError as error:
            raise EvaluateError(str(error)) from None
    data = datasets[dataset_name, dataroot]
    if data.num_classes != num_classes:
        raise EvaluateError(f"{path} classifies into {num_classes} classes, {dataset_name} has {data.num_classes}; "
                            f"give the run's dataset with --dataset")
    network.to(device)
    load_module("wrn", "hardware").set_fp32_precision(protocol["tf32"])  # as main.py set it for the run
    accuracy, loss = test_measurements(network, dataset_module, data, opt.batch_size, protocol["amp"],
                                       protocol["channels_last"])
    fp32 = "tf32" if protocol["tf32"] and device.type == "cuda" else "fp32"  # main.py's settings() words
    settings = ", ".join([fp32 if protocol["amp"] == "none" else f"amp {protocol['amp']}",
                          *(["channels_last"] if protocol["channels_last"] else [])])
    return {"network": name, "dataset": dataset_name, "test_images": len(data.test_labels), "protocol": settings,
            "accuracy": accuracy, "loss": loss, "parameters": sum(p.numel() for p in network.parameters()),
            "gflop": forward_gflop(network.to(memory_format=torch.contiguous_format), device)}


def evaluate(path, opt, device, datasets):
    """The table row of one file."""
    numbers = measure(path, opt, device, datasets)
    return [path, numbers["network"], f"{numbers['dataset']} ({numbers['test_images']} images)", numbers["protocol"],
            f"{100 - numbers['accuracy']:.2f}", f"{numbers['accuracy']:.2f}", f"{numbers['loss']:.4f}",
            f"{numbers['parameters']:,}", f"{numbers['gflop']:.3f}"]


# --- command line ----------------------------------------------------------------------------------

def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("weights", nargs="+", help="net1.pt / net2.pt files written by main.py")
    parser.add_argument("--dataset", default=None, choices=load_module("wrn", "dataset").DATASETS,
                        help="default: the dataset in the log.txt beside each file, else CIFAR100")
    parser.add_argument("--amp", default=None, choices=sorted(AMP_DTYPES),
                        help="autocast of the test pass; default: main.py's --amp in the log.txt beside each file, "
                             "else none (fp32)")
    parser.add_argument("--dataroot", default=None,
                        help="folder holding the dataset; default: the run's --dataroot in the log.txt beside each "
                             "file, else ./data (main.py's default)")
    parser.add_argument("--batch_size", default=500, type=int, help="test batch size (BN in eval mode), as main.py's")
    parser.add_argument("--gpu_id", default=None, type=str,
                        help="the GPU to use; '' for the CPU (default: GPU 0, or the CPU where there is none)")
    parser.add_argument("--nthread", default=load_module("wrn", "hardware").available_cores(), type=int,
                        help="CPU threads for torch (default: the cores this process may use)")
    opt = parser.parse_args(argv)
    if opt.batch_size <= 0 or opt.nthread <= 0:
        parser.error("--batch_size and --nthread must be positive")
    return opt


def select_device(opt):
    # Before CUDA is initialised, as main.py does; '' hides every GPU.
    if opt.gpu_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = opt.gpu_id
    torch.set_num_threads(min(opt.nthread, os.cpu_count() or 1))
    return torch.device("cuda" if opt.gpu_id != "" and torch.cuda.is_available() else "cpu")


def main(argv=None):
    opt = parse_options(argv)
    device = select_device(opt)
    columns = ["file", "network", "test set", "protocol", "test error (%)", "test acc (%)", "test loss",
               "parameters", "GFLOP / image"]
    datasets = {}
    try:
        rows = [evaluate(path, opt, device, datasets) for path in opt.weights]
    except EvaluateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

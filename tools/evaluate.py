"""Test error, parameter count and forward GFLOP of exported networks (SAVE/net1.pt, SAVE/net2.pt).

    python tools/evaluate.py logs/wrn-28-10_mobilenet_dcm_seed1/net*.pt   # the run's dataset, from its --dataroot
    python tools/evaluate.py logs/RUN/net1.pt --dataroot DATA --gpu_id ''   # the dataset from DATA, on the CPU

Each file is loaded (weights_only), strictly, into the network that the run's log.txt beside it
names: net 1 or net 2 of models.build_pair of the folder that trained it (architecture), with the
run's --depth, --width and classes, without auxiliary classifiers. It is tested as main.py tested
it at the last epoch (BN in eval mode; the run's dataset, --dataroot, --eval_batch_size, --amp,
--tf32 and --channels_last, read off that log; --dataroot overrides it), so the error is 100 - the
test_acc_net1/net2 logged last. A --dataroot that is no folder here is refused: nothing is
downloaded. GFLOP: 2 x multiply-adds of one 32x32 image's forward pass. Checkpoints, other
networks and files without their run's log are refused with a message.
Prints a Markdown table. The whole story: docs/reproducing.md.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import paper
from common import FOLDERS, LOG_NAME, ToolError, load_folder, markdown_table, one_line_errors
from summarize import read_log

NET_FILES = ("net1.pt", "net2.pt")  # what main.py exports, net 1 and net 2


# --- the network a file holds ----------------------------------------------------------------------

def run_record(path):
    """The last line of the log.txt beside an exported network: what its run knew."""
    log = Path(path).parent / LOG_NAME
    if Path(path).name not in NET_FILES or not log.is_file():
        raise ToolError(f"{path}: not a {' or '.join(NET_FILES)} beside its run's {LOG_NAME}, which names the "
                        f"network; give the net1.pt or net2.pt of a run in its --save folder")
    return read_log(log)[-1]  # refusing a log that main.py did not write


def read_weights(path):
    """The state dict of an exported network, refusing what is not one."""
    if not os.path.isfile(path):
        raise ToolError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, truncated, or holding objects weights_only refuses
        raise ToolError(f"{path} is not a file of tensors saved by main.py ({type(error).__name__}); "
                        f"give the net1.pt or net2.pt of a finished run") from None
    if not (isinstance(state, dict) and state and all(isinstance(value, torch.Tensor) for value in state.values())):
        raise ToolError(f"{path} is not the state dict of a network; give the net1.pt or net2.pt of a run")
    return state


def build_network(path, state, record, folder):
    """(name, the network with `state` loaded, strictly (auxiliary classifiers refused), in eval mode)."""
    index = NET_FILES.index(Path(path).name)
    name = paper.display_name(record[f"net{index + 1}"])
    network = folder.models.build_pair(record["depth"], record["width"], record["num_classes"], False)[index]
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        detail = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise ToolError(f"{path} does not fit {name}: {detail}") from None
    return name, network.eval()


# --- measurements ----------------------------------------------------------------------------------

def check_dataroot(path, dataset, dataroot, logged):
    """Refuse a dataroot that is no folder here, rather than download the dataset into it."""
    if os.path.isdir(dataroot) or dataset == "synthetic":  # made in memory: no folder needed
        return
    if logged:
        relative = "" if os.path.isabs(dataroot) else " (relative to the folder the run was started in)"
        raise ToolError(f"{path}: the run's --dataroot {dataroot}{relative}, read off "
                        f"{Path(path).parent / 'log.txt'}, is no folder here; give the dataset's folder with "
                        f"--dataroot")
    raise ToolError(f"--dataroot {dataroot} is no folder; give the folder holding the run's dataset")


@torch.no_grad()
def test_measurements(network, folder, data, batch_size, amp, channels_last):
    """(top-1 accuracy (%), mean cross-entropy) of the final classifier on the whole test set, as
    main.py measures them: under autocast to `amp`, the loss in fp32, summed per batch."""
    device = data.test_images.device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    network.to(memory_format=memory_format)
    correct, loss_sum = 0, torch.zeros((), device=device)
    for images, labels in folder.dataset.test_batches(data, batch_size):
        with torch.autocast(device.type, dtype=folder.training.AMP_DTYPES[amp], enabled=amp != "none"):
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
        network(torch.zeros(1, 3, 32, 32, device=device))  # one CIFAR image
    return counter.get_total_flops() / 1e9


def measure(path, opt, device, datasets):
    """{network, dataset, test_images, protocol, accuracy, loss, parameters, gflop} of one file;
    `datasets` caches each loaded dataset by (name, dataroot)."""
    state = read_weights(path)
    record = run_record(path)
    folder = load_folder(record["architecture"])
    name, network = build_network(path, state, record, folder)
    dataset_name, dataroot = record["dataset"], opt.dataroot or record["dataroot"]
    check_dataroot(path, dataset_name, dataroot, logged=not opt.dataroot)
    if (dataset_name, dataroot) not in datasets:
        try:
            datasets[dataset_name, dataroot] = folder.dataset.load_dataset(dataset_name, dataroot, device)
        except folder.dataset.DatasetError as error:
            raise ToolError(str(error)) from None
    data = datasets[dataset_name, dataroot]
    network.to(device)
    folder.hardware.set_fp32_precision(record["tf32"])  # as main.py set it for the run
    accuracy, loss = test_measurements(network, folder, data, record["eval_batch_size"], record["amp"],
                                       record["channels_last"])
    fp32 = "tf32" if record["tf32"] and device.type == "cuda" else "fp32"  # TrainingStep.describe_settings()'s words
    settings = ", ".join([fp32 if record["amp"] == "none" else f"amp {record['amp']}",
                          *(["channels_last"] if record["channels_last"] else [])])
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
    parser.add_argument("--dataroot", default=None,
                        help="the dataset's folder; default: the run's --dataroot in the log.txt beside each file")
    parser.add_argument("--gpu_id", default=None, type=str,
                        help="the GPU to use; '' for the CPU (default: GPU 0, or the CPU where there is none)")
    parser.add_argument("--nthread", default=load_folder(FOLDERS[0]).hardware.available_cores(), type=int,
                        help="CPU threads for torch (default: the cores this process may use)")
    opt = parser.parse_args(argv)
    if opt.nthread <= 0:
        parser.error("--nthread must be positive")
    return opt


def select_device(opt):
    # Before CUDA is initialised, as main.py does; '' hides every GPU.
    if opt.gpu_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = opt.gpu_id
    torch.set_num_threads(min(opt.nthread, os.cpu_count() or 1))
    return torch.device("cuda" if opt.gpu_id != "" and torch.cuda.is_available() else "cpu")


@one_line_errors
def main(argv=None):
    opt = parse_options(argv)
    device = select_device(opt)
    columns = ["file", "network", "test set", "protocol", "test error (%)", "test acc (%)", "test loss",
               "parameters", "GFLOP / image"]
    datasets = {}
    rows = [evaluate(path, opt, device, datasets) for path in opt.weights]
    print("\n".join(markdown_table(columns, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

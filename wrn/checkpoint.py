"""The training state on disk: SAVE/checkpoint.pt to resume a run, SAVE/net1.pt and net2.pt to deploy.

Checkpoints are plain dicts of tensors and Python values, read back with weights_only=True.
This file is identical in wrn/ and wrn_mobi/.
"""
import os

import torch

CHECKPOINT = "checkpoint.pt"
AUX_PREFIXES = ("aux1.", "aux2.")  # where models.py keeps the auxiliary classifiers
# Options that define the networks, the objective and the batches: a checkpoint only resumes a run
# that agrees. The speed options (--amp, --channels_last, --compile, ...) may change on resume.
RUN_DEFINING_OPTIONS = ("method", "links", "depth", "width", "dataset", "seed")


class CheckpointError(Exception):
    """A checkpoint that cannot resume this run: the message says why and what to do."""


def save_checkpoint(opt, epoch, step, optimizer):
    """The full training state after `epoch`, written atomically: an interrupted save keeps the last one."""
    net1, net2 = step.nets
    state = {
        "epoch": epoch,
        "net1": net1.state_dict(),
        "net2": net2.state_dict(),
        "optimizer": optimizer.state_dict(),
        "grad_scaler": step.scaler.state_dict(),  # empty unless --amp fp16
        "options": vars(opt),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_states": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path = os.path.join(opt.save, CHECKPOINT)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(opt, path, step, optimizer, device):
    """Restore a checkpoint into the networks, the optimizer and the loss scaler; return the epoch it completed."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        saved_options = state["options"]
    except Exception as error:  # unreadable, truncated or not a checkpoint of this script
        raise CheckpointError(f"--resume {path} is not a readable checkpoint of this script "
                              f"({type(error).__name__}); give another file") from None
    for name in RUN_DEFINING_OPTIONS:
        if saved_options.get(name) != getattr(opt, name):
            raise CheckpointError(f"--resume {path} was trained with --{name} {saved_options.get(name)}, not "
                                  f"{getattr(opt, name)}; rerun with the run's own flags")
    net1, net2 = step.nets
    try:
        net1.load_state_dict(state["net1"])
        net2.load_state_dict(state["net2"])
    except RuntimeError:
        raise CheckpointError(f"--resume {path} holds networks of another shape (trained by the other folder, "
                              f"wrn/ or wrn_mobi/?); resume it where it was trained") from None
    optimizer.load_state_dict(state["optimizer"])
    if step.scaler.is_enabled() and state.get("grad_scaler"):
        step.scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(state["torch_rng_state"].cpu())
    if torch.cuda.is_available() and state["cuda_rng_states"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng_states"]])
    return state["epoch"]


def export_networks(opt, nets):
    """SAVE/net1.pt, SAVE/net2.pt: state dicts without the auxiliary classifiers, loadable into
    models.wrn(..., aux=False) / models.mobilenet(..., aux=False)."""
    for index, net in enumerate(nets, start=1):
        # contiguous(): the same plain NCHW tensors whether or not the run trained in channels_last.
        backbone = {key: value.cpu().contiguous() for key, value in net.state_dict().items()
                    if not key.startswith(AUX_PREFIXES)}
        torch.save(backbone, os.path.join(opt.save, f"net{index}.pt"))

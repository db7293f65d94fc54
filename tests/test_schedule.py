"""main.py's options and optimisation against SPEC §4: defaults, step lr, momentum reset, usage errors."""
import pytest
import torch

from conftest import load_folder

DROP_EPOCHS = (60, 120, 160)


def options(folder, *argv):
    return load_folder(folder).options.parse_options(list(argv))


# --- options ---------------------------------------------------------------------------------------

def test_defaults_reproduce_the_reference_setup(folder):
    opt = options(folder)
    expected = {"depth": 28, "width": 10, "dataset": "CIFAR100", "dataroot": "./data", "batch_size": 128,
                "lr": 0.1, "epochs": 200, "weight_decay": 5e-4, "epoch_step": "[60,120,160]",
                "lr_decay_ratio": 0.2, "seed": 1, "method": "dcm", "links": "dense"}
    assert {key: getattr(opt, key) for key in expected} == expected


def test_default_save_folder_names_the_pair_method_and_seed(folder):
    net_2 = {"wrn": "wrn-28-10", "wrn_mobi": "mobilenet"}[folder]
    assert options(folder).save.replace("\\", "/") == f"logs/wrn-28-10_{net_2}_dcm_seed1"
    assert options(folder, "--method", "ind", "--seed", "3").save.replace("\\", "/").endswith(f"{net_2}_ind_seed3")


@pytest.mark.parametrize("argv,message", [
    (["--depth", "20"], "--depth 20"),
    (["--depth", "10"], "too shallow"),
    (["--depth", "10", "--method", "ds"], "too shallow"),
    (["--epoch_step", "abc"], "--epoch_step"),
    (["--epoch_step", "[0]"], "--epoch_step"),
    (["--epoch_step", "60"], "--epoch_step"),
    (["--batch_size", "0"], "--batch_size"),
    (["--width", "0"], "--width"),
    (["--weight_decay", "-1"], "--weight_decay"),
    (["--links", "same", "--method", "dml"], "--links"),
    (["--gpu_id", "0,1"], "--gpu_id"),
    (["--eval_batch_size", "0"], "--eval_batch_size"),
    (["--benchmark", "0"], "--benchmark"),
])
def test_bad_options_raise_usage_error(folder, argv, message):
    options = load_folder(folder).options
    with pytest.raises(options.UsageError) as error:
        options.parse_options(argv)
    assert message in str(error.value)


@pytest.mark.parametrize("method", ["ind", "dml"])
def test_depth_10_is_accepted_for_methods_without_aux(folder, method):
    opt = options(folder, "--depth", "10", "--method", method)
    assert (opt.depth, opt.method) == (10, method)


# --- learning rate ----------------------------------------------------------------------------------

def test_default_lr_drops_by_0_2_at_the_start_of_epochs_60_120_160(folder):
    main = load_folder(folder).main
    opt = options(folder)
    for epoch in range(1, 201):
        expected = 0.1 * 0.2 ** sum(epoch >= drop for drop in DROP_EPOCHS)
        assert main.lr_at_epoch(opt, epoch) == pytest.approx(expected, rel=1e-9), epoch
    assert main.lr_at_epoch(opt, 59) == pytest.approx(0.1)
    assert main.lr_at_epoch(opt, 60) == pytest.approx(0.02)
    assert main.lr_at_epoch(opt, 119) == pytest.approx(0.02)
    assert main.lr_at_epoch(opt, 120) == pytest.approx(0.004)
    assert main.lr_at_epoch(opt, 159) == pytest.approx(0.004)
    assert main.lr_at_epoch(opt, 160) == pytest.approx(0.0008)
    assert main.lr_at_epoch(opt, 200) == pytest.approx(0.0008)


def test_custom_epoch_step_and_decay_ratio(folder):
    main = load_folder(folder).main
    opt = options(folder, "--epoch_step", "[2,4]", "--lr_decay_ratio", "0.5", "--lr", "0.4", "--epochs", "6")
    assert [main.lr_at_epoch(opt, epoch) for epoch in range(1, 7)] == pytest.approx([0.4, 0.2, 0.2, 0.1, 0.1, 0.1])


# --- the optimizer across epochs ----------------------------------------------------------------

def simulate_training(folder, *argv, epochs=200):
    """One SGD step per epoch on a tiny parameter, the way main() switches optimizers.

    Returns, per epoch: (optimizer, momentum buffer before the step or None, param before the step, grad)."""
    main = load_folder(folder).main
    opt = options(folder, *argv)
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    params = [param]
    optimizer = main.create_optimizer(opt, params, main.lr_at_epoch(opt, 1))
    history = []
    for epoch in range(1, epochs + 1):
        optimizer = main.optimizer_for_epoch(opt, optimizer, params, epoch)
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        param.grad = torch.full_like(param, 0.1 * epoch)
        before = param.detach().clone()
        history.append((optimizer, None if buffer is None else buffer.clone(), before, param.grad.clone()))
        optimizer.step()
    return main, opt, param, history


def test_optimizer_is_recreated_only_at_lr_drops_and_keeps_momentum_otherwise(folder):
    main, opt, param, history = simulate_training(folder)
    for epoch in range(2, 201):
        previous, _, _, _ = history[epoch - 2]
        optimizer, buffer, _, _ = history[epoch - 1]
        if epoch in DROP_EPOCHS:
            assert optimizer is not previous, epoch
            assert buffer is None, f"momentum not reset at epoch {epoch}"
        else:
            assert optimizer is previous, epoch
            assert buffer is not None, f"momentum lost at epoch {epoch}"
        assert optimizer.param_groups[0]["lr"] == pytest.approx(main.lr_at_epoch(opt, epoch), rel=1e-12), epoch


def test_sgd_settings_match_the_reference(folder):
    _, _, param, history = simulate_training(folder, epochs=61)
    for optimizer in (history[0][0], history[60][0]):
        assert len(optimizer.param_groups) == 1
        group = optimizer.param_groups[0]
        assert group["momentum"] == 0.9
        assert group["nesterov"] is False
        assert group["dampening"] == 0
        assert group["weight_decay"] == 5e-4
        assert group["params"] == [param]


def test_weight_decay_applies_to_every_parameter_of_both_nets(folder):
    modules = load_folder(folder)
    main = modules.main
    opt = options(folder, "--depth", "16", "--width", "1")
    with torch.device("meta"):
        nets = modules.models.build_pair(16, 1, 10, True)
    params = list(nets[0].parameters()) + list(nets[1].parameters())
    optimizer = main.create_optimizer(opt, params, 0.1)
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 5e-4 for p in group["params"]}
    assert decayed == {id(p) for p in params}
    # BN weights and FC biases are among them (the reference decays them too).
    assert any(p.dim() == 1 for p in params)


def test_momentum_update_between_drops_and_its_reset_at_a_drop(folder):
    _, _, _, history = simulate_training(folder, epochs=62)
    lr, weight_decay, momentum = 0.1, 5e-4, 0.9
    # Epoch 59 -> 60 is a drop: the update of epoch 60 must carry no momentum from before.
    for epoch in (30, 59, 60, 61):
        optimizer, buffer, before, grad = history[epoch - 1]
        after = history[epoch][2]
        step_lr = lr * (0.2 if epoch >= 60 else 1.0)
        d_p = grad + weight_decay * before
        if epoch == 60:
            assert buffer is None
            expected = before - step_lr * d_p
        else:
            expected = before - step_lr * (momentum * buffer + d_p)
        torch.testing.assert_close(after, expected, rtol=1e-12, atol=1e-15, msg=f"epoch {epoch}")
    # With momentum kept across the drop the update of epoch 60 would be clearly larger.
    _, buffer_59, _, _ = history[58]
    assert buffer_59.abs().min() > 1


def test_custom_drop_epochs_recreate_the_optimizer(folder):
    _, _, _, history = simulate_training(folder, "--epoch_step", "[2,4]", "--lr_decay_ratio", "0.5", epochs=5)
    optimizers = [record[0] for record in history]
    assert [optimizers[i] is optimizers[i - 1] for i in range(1, 5)] == [False, True, False, True]
    assert [o.param_groups[0]["lr"] for o in optimizers] == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025])

import torch

from dropbp.memory import ActivationMeter


def test_counts_saved_activations_once_and_skips_parameters():
    layer = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    with ActivationMeter(layer.parameters()) as meter:
        y = layer(x)
        z = layer(x)  # the same input storage is saved again: counted once
    assert meter.held_bytes == x.numel() * 4
    with ActivationMeter() as with_weights:
        w = layer(x)
    assert with_weights.held_bytes == (x.numel() + layer.weight.numel()) * 4
    (y + z + w).sum().backward()


def test_backward_releases_what_was_held():
    x = torch.randn(32, 32, requires_grad=True)
    with ActivationMeter() as meter:
        loss = (x.exp() * 2).sum()
    assert meter.held_bytes == x.numel() * 4  # exp saves its output
    loss.backward()
    assert meter.held_bytes == 0


def test_freed_graphs_count_only_when_tracked():
    x = torch.randn(16, 16, requires_grad=True)
    with ActivationMeter(track_freed=True) as meter:
        kept = x.exp()
        x.sin().detach()  # built, then dropped: the detach-style waste
    assert meter.held_bytes == kept.numel() * 4
    assert meter.saved_bytes == 2 * x.numel() * 4
    with ActivationMeter() as untracked:
        pass
    try:
        untracked.saved_bytes
    except ValueError as error:
        assert "track_freed" in str(error)
    else:
        raise AssertionError("saved_bytes without track_freed must raise")


def test_the_same_forward_saves_under_grad_and_nothing_under_no_grad():
    """The meter sees the no-grad forward (what a dropped branch runs) save nothing at all."""
    layer = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    x = torch.randn(4, 16, requires_grad=True)
    with ActivationMeter(layer.parameters()) as meter:
        y = layer(x)
    # x for the first matmul, tanh's output (saved once, also the second matmul's input)
    assert meter.held_bytes == (4 * 16 + 4 * 32) * 4
    with ActivationMeter(layer.parameters()) as meter, torch.no_grad():
        layer(x)
    assert meter.held_bytes == 0
    y.sum().backward()

import torch

from dropbp.memory import ActivationMeter


def test_counts_saved_activations_once_and_skips_parameters():
    layer = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    with ActivationMeter(layer.parameters()) as meter:
        y = layer(x)
        z = layer(x)  # the same input storage is saved again: counted once
    assert meter.bytes == x.numel() * 4
    with ActivationMeter() as with_weights:
        layer(x)
    assert with_weights.bytes == (x.numel() + layer.weight.numel()) * 4
    (y + z).sum().backward()


def test_no_grad_saves_nothing():
    layer = torch.nn.Linear(16, 16)
    with ActivationMeter() as meter, torch.no_grad():
        layer(torch.randn(4, 16))
    assert meter.bytes == 0

import torch
import torch.nn.functional as F

from dropbp.flops import flop_counter, sdpa_forward_flops


def test_cpu_sdpa_is_counted_with_grouped_query_attention():
    q = torch.randn(2, 6, 10, 8)
    kv = torch.randn(2, 2, 10, 8)
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    assert counter.get_total_flops() == 4 * 2 * 6 * 10 * 10 * 8
    assert sdpa_forward_flops((2, 6, 10, 8), (2, 2, 10, 8), (2, 2, 10, 8)) == 4 * 2 * 6 * 10 * 10 * 8


def test_matmuls_are_counted():
    with flop_counter() as counter:
        torch.nn.Linear(16, 4, bias=False)(torch.randn(3, 16))
    assert counter.get_total_flops() == 2 * 3 * 16 * 4

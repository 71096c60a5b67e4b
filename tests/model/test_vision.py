import torch

from qwen2vl.config import VisionConfig
from qwen2vl.model.vision import VisionTransformer, window_order


def test_window_order_cuts_frames_into_row_major_windows_with_partial_edges():
    # one frame of 3 x 5 merged units, windows of 2 x 2 units
    order, lengths = window_order(torch.tensor([[1, 3, 5]]), 2)
    assert order.tolist() == [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
    assert lengths.tolist() == [4, 4, 2, 2, 2, 1]


def test_window_order_keeps_frames_and_items_apart():
    order, lengths = window_order(torch.tensor([[2, 2, 2], [1, 1, 3]]), 2)
    assert order.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert lengths.tolist() == [4, 4, 2, 1]


def test_windows_as_large_as_the_image_are_full_attention():
    torch.manual_seed(0)
    kw = dict(depth=2, embed_dim=16, num_heads=2, hidden_size=24, norm="rmsnorm", mlp="gated")
    full = VisionTransformer(VisionConfig(**kw, intermediate_size=20)).eval()
    windowed = VisionTransformer(VisionConfig(**kw, intermediate_size=20, window_size=112))
    windowed.load_state_dict(full.state_dict())
    grid = torch.tensor([[1, 8, 8], [2, 4, 8]])  # each frame fits one 8 x 8 patch window
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad():
        a, b = full(pixels, grid), windowed.eval()(pixels, grid)
    assert torch.allclose(a, b, atol=1e-5)

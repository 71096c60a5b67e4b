import pytest
import torch

from qwen2vl.errors import Qwen2VLError
from qwen2vl.model.rope import (
    mrope_cos_sin,
    mrope_positions,
    vision_cu_seqlens,
    vision_patch_positions,
)

IMG, VID = 9, 8


def positions(ids, mask=None, images=None, videos=None):
    ids = torch.tensor(ids)
    return mrope_positions(
        ids,
        image_token_id=IMG,
        video_token_id=VID,
        merge=2,
        attention_mask=None if mask is None else torch.tensor(mask),
        image_grid_thw=None if images is None else torch.tensor(images),
        video_grid_thw=None if videos is None else torch.tensor(videos),
    )


def test_worked_example_from_the_reference_docstring():
    # transformers 4.x get_rope_index docstring: a video of 3 temporal, 2 height, 2 width LLM
    # patches followed by 5 text tokens; text starts at max(vision ids) + 1 = 3.
    pos, delta = positions([[VID] * 12 + [1] * 5], videos=[[3, 4, 4]])
    assert pos[0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 4, 5, 6, 7]
    assert pos[1, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 3, 4, 5, 6, 7]
    assert pos[2, 0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 3, 4, 5, 6, 7]
    assert delta.tolist() == [8 - 17]


def test_text_continues_after_the_largest_spatial_side():
    # image 1 x (4/2) x (6/2) after 2 text tokens: ids start at 2; max is 2 + 2 = 4; text at 5.
    pos, delta = positions([[1, 1] + [IMG] * 6 + [1, 1]], images=[[1, 4, 6]])
    assert pos[:, 0, 2:8].tolist() == [[2] * 6, [2, 2, 2, 3, 3, 3], [2, 3, 4, 2, 3, 4]]
    assert pos[0, 0, 8:].tolist() == [5, 6]
    assert delta.tolist() == [7 - 10]


def test_left_padding_is_skipped_and_deltas_are_per_sequence():
    pos, delta = positions(
        [[0, 0, 1] + [IMG] * 4, [1, 1, 1, 1, 1, 1, 1]],
        mask=[[0, 0, 1, 1, 1, 1, 1], [1] * 7],
        images=[[1, 4, 4]],
    )
    assert pos[0, 0].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert pos[1, 0].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert pos[0, 1].tolist() == list(range(7))
    assert delta.tolist() == [3 - 5, 0]


def test_placeholder_count_mismatch_is_a_clear_error():
    with pytest.raises(Qwen2VLError, match="do not match"):
        positions([[1] + [IMG] * 3 + [1]], images=[[1, 4, 4]])
    with pytest.raises(Qwen2VLError, match="more image grids"):
        positions([[1] + [IMG] * 4], images=[[1, 4, 4], [1, 4, 4]])
    with pytest.raises(Qwen2VLError, match="more visual items"):
        positions([[1] + [IMG] * 4 + [1] + [IMG] * 4], images=[[1, 4, 4]])


def test_mrope_sections_pick_their_axis():
    pos = torch.stack([torch.full((1, 1), 5), torch.full((1, 1), 7), torch.full((1, 1), 11)])
    cos, _ = mrope_cos_sin(pos, head_dim=16, theta=10000.0, section=[2, 3, 3], dtype=torch.float32)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    ids = torch.tensor([5, 5, 7, 7, 7, 11, 11, 11]).float()
    assert torch.allclose(cos[0, 0, :8], torch.cos(ids * inv))
    assert torch.allclose(cos[0, 0, 8:], cos[0, 0, :8])


def test_vision_positions_keep_merge_windows_contiguous():
    rc = vision_patch_positions(torch.tensor([[1, 2, 4]]), merge=2)
    assert rc.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]


def test_vision_windows_are_per_image_and_per_frame():
    cu = vision_cu_seqlens(torch.tensor([[1, 2, 4], [3, 4, 2]]))
    assert cu.tolist() == [0, 8, 16, 24, 32]


def video_positions(grid, seconds, tokens_per_second=2):
    t, h, w = grid
    ids = torch.tensor([[1, 1] + [VID] * (t * h * w // 4) + [1]])
    pos, _ = mrope_positions(
        ids,
        image_token_id=IMG,
        video_token_id=VID,
        merge=2,
        video_grid_thw=torch.tensor([grid]),
        second_per_grid_ts=None if seconds is None else torch.tensor(seconds),
        tokens_per_second=tokens_per_second,
    )
    return pos[:, 0]


@pytest.mark.parametrize(
    "fps, temporal",
    [
        (2.0, [0, 2, 4, 6]),  # 1 s per grid step
        (4.0, [0, 1, 2, 3]),  # 0.5 s: a release that truncated it to int gave [0, 0, 0, 0]
        (3.0, [0, 1, 2, 4]),  # 2/3 s: floor(t * 0.6666667 * 2) in float32; 3 * 2/3 * 2 is 4
        (1.0, [0, 4, 8, 12]),  # 2 s
    ],
)
def test_absolute_time_worked_example(fps, temporal):
    # Qwen2.5-VL, tokens_per_second 2, temporal_patch_size 2: second_per_grid = 2 / fps; a video
    # of 4 x (4/2) x (4/2) LLM patches after 2 text tokens starts at id 2.
    pos = video_positions((4, 4, 4), [2 / fps])
    assert pos[0, 2:18].view(4, 4)[:, 0].tolist() == [2 + t for t in temporal]
    assert pos[1, 2:18].tolist() == [2, 2, 3, 3] * 4 and pos[2, 2:18].tolist() == [2, 3] * 8
    # The text after it continues at max(all ids) + 1 as the original release does;
    # transformers 5.24 continues at start + max(h, w) = 4, behind the video's last time step.
    assert pos[:, 18].tolist() == [2 + max(temporal[-1], 1) + 1] * 3


def test_absolute_time_defaults_to_one_second_per_grid_and_leaves_images():
    assert torch.equal(video_positions((2, 4, 4), None), video_positions((2, 4, 4), [1.0]))
    plain = video_positions((2, 4, 4), [1.0], tokens_per_second=None)
    assert plain[0, 2:10].tolist() == [2] * 4 + [3] * 4  # Qwen2-VL: one id per grid step
    ids = torch.tensor([[1] + [IMG] * 4])
    scaled, _ = mrope_positions(
        ids,
        image_token_id=IMG,
        video_token_id=VID,
        merge=2,
        image_grid_thw=torch.tensor([[1, 4, 4]]),
        tokens_per_second=2,
    )
    assert torch.equal(scaled, positions(ids.tolist(), images=[[1, 4, 4]])[0])


def test_second_per_grid_count_must_match_videos():
    with pytest.raises(Qwen2VLError, match="2 second_per_grid_ts"):
        video_positions((2, 4, 4), [1.0, 1.0])

"""The bottom layer's shared rules: per-U-Net options, resizing, atomic writes."""

import os

import pytest
import torch

from dalle2_decoder.common.files import atomic_write, atomic_write_text
from dalle2_decoder.common.images import resize
from dalle2_decoder.common.per_unet import as_list, per_unet


def test_per_unet_repeats_a_single_value_and_keeps_a_list_of_the_right_length():
    assert per_unet(0.5, 3) == [0.5, 0.5, 0.5]
    assert per_unet([1, 2], 2) == [1, 2]
    assert per_unet((1, 2), 2) == [1, 2]


def test_per_unet_names_the_option_of_a_list_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"train\.lr has 3 entries but there are 2 U-Nets"):
        per_unet([1, 2, 3], 2, name="train.lr")


def test_as_list_wraps_a_single_value():
    assert as_list(3) == [3]
    assert as_list([1, 2, 3]) == [1, 2, 3]


def test_resize_filters_when_shrinking_and_picks_pixels_with_nearest():
    # A one-pixel checkerboard: shrinking it by 2 with a filter gives flat grey, picking pixels gives
    # one colour of the board.
    board = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float()[None, None]
    smooth = resize(board, 4)
    assert torch.allclose(smooth, torch.full_like(smooth, 0.5), atol=0.02)  # edges see a little less of the board
    assert torch.allclose(smooth[..., 1:3, 1:3], torch.tensor(0.5), atol=1e-6)
    picked = resize(board, 4, mode="nearest")
    assert set(picked.unique().tolist()) <= {0.0, 1.0} and picked.std() == 0


def test_resize_keeps_thin_lines_when_shrinking_by_four():
    # One lit column in four: shrunk 8 -> 2, a filter keeps about a quarter of the light; plain
    # bilinear sampling reads only the dark columns between the lit ones and loses the lines.
    lines = (torch.arange(8) % 4 == 0).float().expand(8, 8)[None, None].clone()
    shrunk = resize(lines, 2)
    assert shrunk.min() > 0.15 and abs(shrunk.mean().item() - 0.25) < 0.05


def test_resize_returns_float_and_leaves_the_right_size_alone():
    images = torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)
    out = resize(images, 8)
    assert out.dtype == torch.float32 and torch.equal(out, images.float())
    assert resize(images, (4, 6)).shape == (2, 3, 4, 6)


def test_atomic_write_replaces_whole_or_keeps_the_old_file(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first")
    assert target.read_text() == "first"

    def fails(temp):
        temp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails)
    assert target.read_text() == "first"
    assert os.listdir(target.parent) == ["file.txt"]  # no temporary file left behind


def test_atomic_write_syncs_the_data_and_the_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    atomic_write_text(tmp_path / "state.json", "{}")
    assert len(synced) == 2
    assert synced[0].endswith(".tmp") and synced[1] == str(tmp_path)

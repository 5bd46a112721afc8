"""How a checkpoint is committed: ``latest`` names only a checkpoint every rank has finished, and a
save that dies part-way leaves the previous checkpoints and ``latest`` as they were."""

from pathlib import Path

import pytest

from training.distributed import check_checkpoint_layout, recover_checkpoints, save_checkpoint
from training.errors import UserError


class Killed(BaseException):
    """A pod's death in the middle of a save (nothing after it runs)."""


class FakeEngine:
    """DeepSpeed's save, as far as this module sees it: each rank writes its files into
    ``directory/tag`` (here a model file and a ZeRO part), optionally dying between the two."""

    def __init__(self, die_after_first_file: bool = False):
        self.die = die_after_first_file

    def save_checkpoint(self, directory: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert not save_latest  # latest is Tandem's to write, once every rank is done
        folder = Path(directory) / tag
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights " + repr(client_state).encode())
        if self.die:
            raise Killed
        (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optimizer")


def test_latest_names_only_a_complete_checkpoint(tmp_path):
    save_checkpoint(FakeEngine(), tmp_path, "step00000002", {"step": 2})
    assert (tmp_path / "latest").read_text() == "step00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000002"]

    with pytest.raises(Killed):  # killed after the model file, before the optimizer's
        save_checkpoint(FakeEngine(die_after_first_file=True), tmp_path, "step00000004", {"step": 4})
    assert (tmp_path / "latest").read_text() == "step00000002"
    assert not (tmp_path / "step00000004").exists()

    recover_checkpoints(tmp_path)  # the restarted run's start
    save_checkpoint(FakeEngine(), tmp_path, "step00000004", {"step": 4})
    assert (tmp_path / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000002", "step00000004"]


def test_a_save_at_an_existing_step_replaces_its_folder_whole(tmp_path):
    """A run resumed from an earlier checkpoint saves again at steps the run before it saved; what
    that run wrote there (e.g. a ZeRO part of a process this run does not have) must not stay."""
    save_checkpoint(FakeEngine(), tmp_path, "step00000002", {"step": 2})
    (tmp_path / "step00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"another process")
    with pytest.raises(Killed):
        save_checkpoint(FakeEngine(die_after_first_file=True), tmp_path, "step00000002", {"step": 2, "again": 1})
    assert len(list((tmp_path / "step00000002").iterdir())) == 3  # the old one untouched
    recover_checkpoints(tmp_path)  # the restarted run's start
    save_checkpoint(FakeEngine(), tmp_path, "step00000002", {"step": 2, "again": 1})
    files = sorted(p.name for p in (tmp_path / "step00000002").iterdir())
    assert files == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert b"again" in (tmp_path / "step00000002" / "mp_rank_00_model_states.pt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000002"]


def test_a_cut_off_checkpoint_file_is_one_line_naming_it(tmp_path):
    import torch

    for step in (2, 4):
        folder = tmp_path / f"step0000000{step}"
        folder.mkdir()
        torch.save({"module": {}}, folder / "mp_rank_00_model_states.pt")
    assert not check_checkpoint_layout(tmp_path / "step00000004", 0, 1)
    whole = (tmp_path / "step00000004" / "mp_rank_00_model_states.pt").read_bytes()
    (tmp_path / "step00000004" / "mp_rank_00_model_states.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"^checkpoint step00000004 cannot be read: mp_rank_00_model_states.pt is "
                                        r"cut off or not a checkpoint file; resume from an earlier one "
                                        r"\(--resume step00000002\)$"):
        check_checkpoint_layout(tmp_path / "step00000004", 0, 1)


def test_a_save_killed_between_its_renames_is_put_back(tmp_path):
    """Killed after moving the old ``<tag>`` aside and before moving the new one in, a save leaves
    ``latest`` naming a missing folder; the next run's start puts the old one back (and drops the
    rest)."""
    save_checkpoint(FakeEngine(), tmp_path, "step00000002", {"step": 2})
    (tmp_path / "step00000002").rename(tmp_path / ".replaced-step00000002")
    (tmp_path / ".saving-step00000002").mkdir()
    (tmp_path / ".resize-step00000002").mkdir()
    (tmp_path / ".pruning-step00000001").mkdir()  # a prune killed mid-delete: out of the step* names first
    recover_checkpoints(tmp_path)  # the next run's start
    save_checkpoint(FakeEngine(), tmp_path, "step00000003", {"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000002", "step00000003"]
    assert len(list((tmp_path / "step00000002").iterdir())) == 2


def test_a_missing_or_emptied_checkpoint_is_one_line(tmp_path):
    """`--resume stepX` of an empty folder, or `latest` naming a deleted one, reached DeepSpeed's bare
    AssertionError."""
    save_checkpoint(FakeEngine(), tmp_path, "step00000002", {"step": 2})
    (tmp_path / "step00000004").mkdir()
    with pytest.raises(UserError, match=r"^checkpoint step00000004 in .* holds no model states; resume from an "
                                        r"earlier one \(--resume step00000002\)$"):
        check_checkpoint_layout(tmp_path / "step00000004", 0, 1)
    with pytest.raises(UserError, match=r"^checkpoint step00000006 in .* does not exist; resume from an earlier"):
        check_checkpoint_layout(tmp_path / "step00000006", 0, 1)

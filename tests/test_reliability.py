"""Nothing lost: faults injected into training runs and their checkpoints (issue 20, items 1-6).

Each test names the fault. Runs are the eager smoke preset on a 24-image folder (6 steps per epoch).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from test_train_cli import COMMON, make_folder

import fdino
from fdino import checkpoint as ckpt
from fdino import cli
from fdino import run_folder as rf
from fdino.presets import preset


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"))


def train_args(images, run_dir, *extra: str) -> list[str]:
    return ["train", *COMMON, "--data", str(images), "--run-dir", str(run_dir), "--no-compile", *extra]


def snapshot_files(run_dir) -> dict[str, bytes]:
    """Every file of a run folder (but the lock) and its bytes."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != rf.LOCK_NAME
    }


# --- 1. --overwrite keeps the old run until the new one is durable -------------------------------------
def test_overwrite_that_fails_at_step_one_keeps_the_old_run(tmp_path, images, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(train_args(images, run_dir, "--max-steps", "4", "--ckpt-every", "2")) == 0
    before = snapshot_files(run_dir)
    assert "summary.json" in before and "ckpt-00000004.pt" in before

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(fdino.train, "train_step_eager", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"), pytest.warns(UserWarning, match="old run is restored"):
        fdino.train.run(*cli.train_settings(train_args(images, run_dir, "--max-steps", "4")[1:]), overwrite=True)
    assert snapshot_files(run_dir) == before  # every file of the old run, byte for byte
    assert not (run_dir / rf.REPLACED).exists()


def test_overwrite_killed_before_its_first_checkpoint_is_undone_at_the_next_start(tmp_path, images):
    run_dir = tmp_path / "run"
    assert cli.main(train_args(images, run_dir, "--max-steps", "2", "--ckpt-every", "2")) == 0
    before = snapshot_files(run_dir)
    # What a SIGKILL between "old run set aside" and "first checkpoint" leaves behind:
    rf.set_aside(run_dir)
    (run_dir / "run.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.warns(UserWarning, match="restored"):
        rf.recover(run_dir, ckpt.list_checkpoints)
    assert snapshot_files(run_dir) == before


def test_overwrite_deletes_the_old_run_once_the_new_one_has_a_checkpoint(tmp_path, images):
    run_dir = tmp_path / "run"
    assert cli.main(train_args(images, run_dir, "--max-steps", "4", "--ckpt-every", "2")) == 0
    (run_dir / "tb").mkdir(exist_ok=True)
    (run_dir / "tb" / "events.old").write_text("old")
    assert cli.main(train_args(images, run_dir, "--max-steps", "2", "--ckpt-every", "2", "--overwrite")) == 0
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["ckpt-00000002.pt"]
    assert not (run_dir / rf.REPLACED).exists() and not (run_dir / "tb" / "events.old").exists()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


# --- 2. one writer per run folder, unique temp names ---------------------------------------------------
def test_a_second_process_on_a_busy_run_folder_gets_a_clear_error_naming_the_holder(tmp_path, images):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from fdino.run_folder import RunLock\nwith RunLock({str(run_dir)!r}):\n"
            "    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run(
            [sys.executable, "-m", "fdino", *train_args(images, run_dir, "--max-steps", "2")],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"pid {holder.pid}" in proc.stderr and "in use" in proc.stderr
    assert not ckpt.list_checkpoints(run_dir)
    # The holder was killed: its lock went with it, no stale-lock cleanup needed.
    assert cli.main(train_args(images, run_dir, "--max-steps", "2", "--ckpt-every", "2")) == 0


def test_temp_names_are_unique_across_hosts_pids_and_calls(tmp_path):
    names = {rf.temp_name(tmp_path / "ckpt-00000002.pt").name for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith(".ckpt-00000002.pt.tmp-") and str(os.getpid()) in n for n in names)


# --- 3. damaged newest checkpoint: fall back, name it; none valid: a clear message ----------------------
@pytest.fixture
def three_checkpoints(tmp_path, images):
    run_dir = tmp_path / "run"
    args = train_args(images, run_dir, "--max-steps", "6", "--ckpt-every", "2", "--deterministic")
    assert cli.main(args) == 0
    return run_dir


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = bytearray()
    elif how == "truncated":
        data = data[: len(data) // 2]
    else:  # one flipped bit in the middle of the largest tensor's bytes (not in zip headers or padding)
        with zipfile.ZipFile(path) as z:
            entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        header = entry.header_offset
        name_len, extra_len = struct.unpack("<HH", bytes(data[header + 26 : header + 30]))
        data[header + 30 + name_len + extra_len + entry.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["empty", "truncated", "bitflip"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_is_used(three_checkpoints, how):
    run_dir = three_checkpoints
    newest = ckpt.list_checkpoints(run_dir)[-1]
    _damage(newest, how)
    with pytest.raises(ckpt.CorruptCheckpointError, match=newest.name) as err:
        ckpt.read_payload(newest)
    if how == "bitflip":  # torch.load reads a flipped tensor bit without complaint: only the checksum sees it
        assert "SHA-256" in str(err.value)
        torch.load(newest, weights_only=True)
    with pytest.warns(UserWarning, match=newest.name):
        state, loop, used = ckpt.load_newest_valid(run_dir)
    assert used.name == "ckpt-00000004.pt" and int(state.step) == loop["step"] == 4


def test_resume_after_a_damaged_checkpoint_redoes_its_steps_bitwise(three_checkpoints, tmp_path, images):
    run_dir = three_checkpoints
    whole, _ = ckpt.load_checkpoint(ckpt.list_checkpoints(run_dir)[-1])
    _damage(ckpt.list_checkpoints(run_dir)[-1], "bitflip")
    (run_dir / ".ckpt-00000008.pt.tmp-host-1-dead").write_bytes(b"partial")  # a kill inside a save
    with pytest.warns(UserWarning, match="ckpt-00000006.pt"):
        assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    again, _ = ckpt.load_checkpoint(ckpt.list_checkpoints(run_dir)[-1])
    assert int(again.step) == 6 and fdino.tree_allclose(again, whole)
    assert not list(run_dir.glob(".*.tmp-*"))


def test_model_loaders_skip_a_damaged_newest_checkpoint(three_checkpoints):
    from fdino.weights import load_model

    newest = ckpt.list_checkpoints(three_checkpoints)[-1]
    _damage(newest, "bitflip")
    with pytest.warns(UserWarning, match=newest.name):
        model = load_model(three_checkpoints)
    assert model.image_size > 0


def test_no_valid_checkpoint_is_a_message_not_a_traceback(three_checkpoints, capsys):
    for path in ckpt.list_checkpoints(three_checkpoints):
        _damage(path, "truncated")
    assert cli.main(["train", "--resume", str(three_checkpoints), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in it is valid" in err and "ckpt-00000002.pt" in err and "Traceback" not in err


# --- 4. disk full during a save ---------------------------------------------------------------------------
def test_disk_full_during_a_save_keeps_older_checkpoints_and_leaves_no_temp_file(tmp_path, images, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real_save = torch.save
    calls = []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 3:  # the third checkpoint finds the disk full, half-way through
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    args = train_args(images, run_dir, "--max-steps", "6", "--ckpt-every", "2", "--keep-checkpoints", "1")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "ckpt-00000004.pt" in err and "--resume" in err
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["ckpt-00000004.pt"]  # retention did not run
    ckpt.read_payload(run_dir / "ckpt-00000004.pt")  # intact
    assert not list(run_dir.glob(".*.tmp-*"))


# --- 5. run.json: atomic, rebuilt from the checkpoint -------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_resume_rebuilds_a_missing_or_corrupt_run_json_from_the_checkpoint(tmp_path, images, damage):
    run_dir = tmp_path / "run"
    assert cli.main(train_args(images, run_dir, "--max-steps", "2", "--ckpt-every", "2")) == 0
    original = json.loads((run_dir / "run.json").read_text())
    if damage == "missing":
        (run_dir / "run.json").unlink()
    else:
        (run_dir / "run.json").write_text('{"config": {"arch": ')  # what a non-atomic write cut short leaves
    with pytest.warns(UserWarning, match="rebuilt it from the newest checkpoint"):
        assert cli.main(["train", "--resume", str(run_dir), "--max-steps", "4", "--no-progress"]) == 0
    rebuilt = json.loads((run_dir / "run.json").read_text())
    assert rebuilt["config"] == original["config"] and rebuilt["options"]["data"] == original["options"]["data"]
    assert int(ckpt.load_checkpoint(run_dir)[0].step) == 4


def test_run_json_is_written_by_rename_so_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    rf.write_run_meta(tmp_path, {"config": {}, "options": {}})
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):
        rf.write_run_meta(tmp_path, {"config": {"lr": 1.0}, "options": {}})
    assert json.loads(path.read_text()) == {"config": {}, "options": {}}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


# --- 6. the non-finite advice works: resume with safe overrides and --skip-batches ---------------------------
def test_a_nan_batch_is_stepped_over_by_resuming_with_a_lower_lr_and_skip_batches(
    tmp_path, images, monkeypatch, capsys
):
    from fdino.data import MultiCropLoader

    original = MultiCropLoader.epoch

    def poisoned(self, epoch, start_batch=0):
        for i, (crops, labels) in enumerate(original(self, epoch, start_batch)):
            if epoch * len(self) + start_batch + i == 4:  # only the 5th batch of the data is NaN
                crops = [torch.full_like(c, float("nan")) for c in crops]
            yield crops, labels

    monkeypatch.setattr(MultiCropLoader, "epoch", poisoned)
    run_dir = tmp_path / "run"
    args = train_args(images, run_dir, "--max-steps", "8", "--ckpt-every", "2", "--log-every", "1")
    assert cli.main(args) == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "ckpt-00000004.pt" in err and "--lr" in err and "--skip-batches" in err
    resume = ["train", "--resume", str(run_dir), "--no-progress"]
    assert cli.main([*resume, "--out-dim", "8"]) == 2  # not a safe override
    assert "--out-dim" in capsys.readouterr().err
    assert cli.main([*resume, "--lr", "0.0001", "--skip-batches", "1"]) == 0
    state, loop = ckpt.load_checkpoint(run_dir)
    assert int(state.step) == 8 and loop["skipped_batches"] == 1 and state.cfg.lr == 0.0001
    assert all(torch.isfinite(t).all() for t in state.student.values())
    meta = json.loads((run_dir / "run.json").read_text())
    assert [(c["step"], c["config"], c["skip_batches"]) for c in meta["changes"]] == [(4, {"lr": 0.0001}, 1)]
    assert meta["config"]["lr"] != 0.0001  # the original config stays on record
    assert rf.config_at(meta, 3).lr == meta["config"]["lr"] and rf.config_at(meta, 4).lr == 0.0001


def test_finite_check_covers_batchnorm_buffers_and_optimizer_moments():
    from fdino.train_guard import nonfinite_parts

    state = fdino.init_state(preset("small32_resnet").replace(steps_per_epoch=2), device="cpu")
    assert nonfinite_parts(state) == []
    bn = next(k for k, v in state.student_buffers.items() if k.endswith("running_var"))
    state.student_buffers[bn][0] = float("inf")
    moment = next(iter(state.opt.exp_avg_sq))
    state.opt.exp_avg_sq[moment].view(-1)[0] = float("nan")
    assert nonfinite_parts(state) == ["student_buffers", "opt.exp_avg_sq"]


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    state = fdino.init_state(preset("smoke").replace(steps_per_epoch=2), device="cpu")
    old = {"format": ckpt.FORMAT, "state": ckpt.state_to_dict(state), "loop": {"step": 0}}
    torch.save(old, tmp_path / "ckpt-00000000.pt")
    loaded, loop = ckpt.load_checkpoint(tmp_path / "ckpt-00000000.pt")
    assert fdino.tree_allclose(loaded, state) and loop == {"step": 0}


# --- the kill campaign (bench/faults.py; 20 kills there, 2 here) -------------------------------------------
def test_kill_campaign_runs_and_every_killed_run_resumes_bitwise(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "faults.py")
    proc = subprocess.run(
        [sys.executable, script, "--kills", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "faults.json").read_text())
    assert [r["killed"] for r in report["kills"]] == [True, True]
    assert report["bitwise_equal"] == 2, report
    assert "2 of 2" in (tmp_path / "faults.md").read_text()

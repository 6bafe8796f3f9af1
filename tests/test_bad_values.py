"""Every bad value is one line and exit 2, before any work, and never loses what is stored (issue #11).

Each case was a traceback, a silent success or work thrown away before these checks existed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.cli import db as db_cli
from cbir.cli import evaluate, index, retrieve, train
from cbir.cli.common import run
from cbir.database import Database, list_databases
from cbir.models import create_extractor, save_extractor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained effnet at 32 px: enough to embed, quick to build."""
    return save_extractor(tmp_path_factory.mktemp("weights") / "effnet.pt",
                          create_extractor("effnet", 8, pretrained=False, input_size=32))


def one_line_error(capsys, main, argv, *, after_work: bool = False) -> str:
    """The error line of a command that must fail with exit 2; with ``after_work`` progress and skipped files may
    come before it, else it is all the command printed."""
    assert run(main, argv) == 2
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert "Traceback" not in err and (after_work or len(lines) == 1), err
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, err
    return lines[-1]


def test_numbers_out_of_range_are_refused_by_flag(capsys, synthetic_data, checkpoint, private_home):
    data = str(synthetic_data["index"])
    query = str(next((synthetic_data["query"] / "shapes_disc").iterdir()))
    cases = [
        (index.main, ["--path", data, "--weights", str(checkpoint), "--batch_size", "0"], "--batch_size"),
        (index.main, ["--path", data, "--weights", str(checkpoint), "--batch_size", "-1"], "--batch_size"),
        (index.main, ["--path", data, "--weights", str(checkpoint), "--num_workers", "-1"], "--num_workers"),
        (index.main, ["--path", data, "--weights", str(checkpoint), "--chunk", "x"], "--chunk"),
        (retrieve.main, ["--path", query, "--batch_size", "0"], "--batch_size"),
        (retrieve.main, ["--path", query, "--nrt_neigh", "-3"], "--nrt_neigh"),
        (evaluate.main, ["--path", data, "--repeats", "0"], "--repeats"),
        (evaluate.main, ["--path", data, "--seed", "-1"], "--seed"),
    ]
    for main, argv, flag in cases:
        err = one_line_error(capsys, main, [*argv, "--home", str(private_home)])
        assert flag in err, err
    assert list_databases(home=private_home) == []  # nothing was opened, let alone created


@pytest.mark.parametrize("flag, value", [("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--decay", "-0.1"),
                                         ("--num_features", "1000000000"), ("--num_features", "0"),
                                         ("--images_per_class", "0"), ("--val_fraction", "1.5")])
def test_training_values_are_refused_before_any_work(capsys, tmp_path, synthetic_data, flag, value):
    weights = tmp_path / "out" / "w.pt"
    err = one_line_error(capsys, train.main, ["--model", "effnet", "--training_data", str(synthetic_data["train"]),
                                              "--weights", str(weights), flag, value])
    assert flag in err
    assert not weights.parent.exists()


def test_weights_naming_a_folder_is_refused_before_training(capsys, tmp_path, synthetic_data):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    err = one_line_error(capsys, train.main, ["--model", "effnet", "--training_data", str(synthetic_data["train"]),
                                              "--weights", str(folder)])
    assert "--weights" in err and "is a folder" in err
    assert list(folder.iterdir()) == []  # no epoch ran: no temporary file


def test_weights_where_the_system_makes_no_file_is_one_line(capsys, synthetic_data):
    # /proc: writable to root by its modes, yet nothing can be made there; others are refused by the check
    code = run(train.main, ["--model", "effnet", "--scratch", "--input_size", "32", "--num_epochs", "1",
                            "--max_batches", "1", "--num_workers", "0", "--training_data", str(synthetic_data["train"]),
                            "--weights", "/proc/cbir-test/x.pt"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "/proc/cbir-test" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_outputs_of_the_wrong_kind_are_refused_before_any_work(capsys, tmp_path, synthetic_data, checkpoint,
                                                                private_home):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    query = str(next((synthetic_data["query"] / "shapes_disc").iterdir()))
    home = ["--home", str(private_home)]
    data = str(synthetic_data["query"])
    cases = [
        (retrieve.main, ["--path", query, "--results_dir", str(a_file)], "--results_dir"),
        (retrieve.main, ["--path", query, "--results_dir", str(a_file / "below")], "--results_dir"),
        (evaluate.main, ["--path", data, "--output", str(a_folder)], "--output"),
        (evaluate.main, ["--path", data, "--measure", "separated", "--excel_path", str(a_folder)], "--excel_path"),
        (evaluate.main, ["--path", data, "--measure", "separated", "--excel_path", str(tmp_path / "x.csv")],
         "--excel_path"),
        (evaluate.main, ["--path", data, "--measure", "separated", "--name", "a/b"], "--name"),
        (evaluate.main, ["--path", data, "--cms", str(a_file)], "--cms"),
        (index.main, ["--path", data, "--weights", str(a_folder)], "--weights"),
    ]
    for main, argv, flag in cases:
        assert flag in one_line_error(capsys, main, [*argv, *home])
    assert list_databases(home=private_home) == []


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    (lambda p: p["config"].pop("model"), "'model'"),
    (lambda p: p["config"].__setitem__("num_features", "eight"), "'num_features'"),
    (lambda p: p["config"].__setitem__("mean", [0.5]), "mean"),
    (lambda p: p["state_dict"].pop(next(iter(p["state_dict"]))), "do not fit"),
    (lambda p: p["state_dict"].__setitem__("head.weight", torch.zeros(3, 3)), "do not fit"),
    (lambda p: p.__setitem__("state_dict", [1, 2]), "not mappings"),
])
def test_hand_made_checkpoints_are_one_line_errors(capsys, tmp_path, checkpoint, synthetic_data, private_home,
                                                   damage, message):
    payload = torch.load(checkpoint, weights_only=True)
    damage(payload)
    broken = tmp_path / "broken.pt"
    torch.save(payload, broken)
    err = one_line_error(capsys, index.main, ["--path", str(synthetic_data["index"]), "--weights", str(broken),
                                              "--home", str(private_home)])
    assert message in err
    assert list_databases(home=private_home) == []


def test_checkpoints_go_through_a_unique_temporary_file_never_left_behind(tmp_path, monkeypatch):
    extractor = create_extractor("effnet", 8, pretrained=False, input_size=32)
    target = tmp_path / "w.pt"
    written = []
    real_save = torch.save

    def recording_save(obj, path, *args, **kwargs):
        written.append(Path(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", recording_save)
    save_extractor(target, extractor)
    save_extractor(target, extractor)
    # Two writers of the same checkpoint (two trainings to one --weights) never share a temporary file.
    assert len(set(written)) == 2 and all(p.parent == tmp_path and p != target for p in written)

    def interrupted_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        save_extractor(target, extractor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"] and target.read_bytes() == before


def test_index_without_an_extractor_on_a_new_name_creates_nothing(capsys, synthetic_data, private_home):
    err = one_line_error(capsys, index.main, ["--path", str(synthetic_data["index"]), "--db_name", "fresh",
                                              "--home", str(private_home)])
    assert "--weights" in err and "fresh" in err
    assert list_databases(home=private_home) == [] and not (private_home / "fresh").exists()


@pytest.mark.slow
def test_rewrite_with_no_readable_file_keeps_the_database(capsys, tmp_path, checkpoint, synthetic_data,
                                                          private_home):
    home = ["--home", str(private_home), "--num_workers", "0"]
    assert run(index.main, ["--path", str(synthetic_data["index"]), "--weights", str(checkpoint), *home]) == 0
    with Database.open("db", home=private_home) as db:
        stored = len(db)
    assert stored == 24
    broken = tmp_path / "broken" / "pbc_x"
    broken.mkdir(parents=True)
    for name in ("a.png", "b.jpg"):
        (broken / name).write_bytes(b"not an image")
    err = one_line_error(capsys, index.main, ["--path", str(broken.parent), "--weights", str(checkpoint),
                                              "--rewrite", *home], after_work=True)
    assert "could be read" in err and "left as it was" in err
    with Database.open("db", home=private_home) as db:
        assert len(db) == stored
    # A new database that nothing could go into is not left behind either.
    one_line_error(capsys, index.main, ["--path", str(broken.parent), "--weights", str(checkpoint),
                                        "--db_name", "empty", *home], after_work=True)
    assert list_databases(home=private_home) == ["db"]


@pytest.mark.slow
def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    home = tmp_path / "home"
    with Database.open("piped", home=home, create=True) as db:
        db.add([f"/x/{i}.png" for i in range(3)], ["a", "b", "c"], np.eye(3, 4, dtype=np.float32))
    script = Path(sys.executable).with_name("cbir-db")
    # `true` exits without reading: every write of cbir-db meets a closed pipe (as `| head -3` does on long output).
    done = subprocess.run(["bash", "-c", f'"{script}" info --db_name piped --home "{home}" | true; '
                                         'exit "${PIPESTATUS[0]}"'],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CBIR_HOME": str(home)})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert run(db_cli.main, ["info", "--db_name", "piped", "--home", str(home)]) == 0  # and the database is intact

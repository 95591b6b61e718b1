"""Crashes and messages of issue 25: one line, the right exit code, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from napari_sam2unet.cli import main

MR = os.path.join(os.path.dirname(__file__), "data", "totalseg", "example_mr_sm.nii.gz")  # 117x91x20
_CLI = [sys.executable, "-c", "import sys; from napari_sam2unet.cli import main; sys.exit(main())"]


def _one_line(text: str, *words: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_usage_mistakes_are_one_line_with_the_help_hint(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["segment", MR, "--out", "x.nii.gz", "--bogus"])
    assert stopped.value.code == 2
    _one_line(capsys.readouterr().err, "unrecognized arguments: --bogus", "--help`")
    with pytest.raises(SystemExit):
        main(["segment", MR, "--out", "x.nii.gz", "--window", "-160:240"])
    _one_line(capsys.readouterr().err, "--window", "--window=-160:240")


def test_a_slice_out_of_range_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import napari_sam2unet.models as models

    monkeypatch.setattr(models, "find_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out.nii.gz"
    assert main(["segment", MR, "--out", str(out), "--box", "25:10,10,40,40"]) == 2
    _one_line(capsys.readouterr().err, "slice 25", "0 to 19")
    assert main(["segment", MR, "--out", str(out), "--point", "5:500,10"]) == 2
    _one_line(capsys.readouterr().err, "outside the slice")
    assert not out.exists()


@pytest.mark.parametrize("scope", ["propagate", "between", "slices"])
def test_a_scope_that_starts_from_prompts_needs_one(tmp_path, capsys, scope):
    out = tmp_path / "out.nii.gz"
    assert main(["segment", MR, "--out", str(out), "--scope", scope]) == 2
    _one_line(capsys.readouterr().err, f"--scope {scope}", "--box")
    assert not out.exists()


def test_info_into_a_pipe_closed_early_exits_quietly():
    """`sam2unet info | head -1`: no BrokenPipeError traceback."""
    info = subprocess.Popen([*_CLI, "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    info.stdout.readline()
    info.stdout.close()  # head has what it wanted
    err = info.stderr.read().decode()
    assert info.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_train_without_torch_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from napari_sam2unet.cli import main\n"
            f"sys.exit(main(['train', '--out-dir', {str(tmp_path / 'run')!r}, '--steps', '1']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    _one_line(run.stderr, "training needs PyTorch", "[train]")
    assert not (tmp_path / "run").exists()


def test_cards_by_name_in_yml_an_upper_case_onnx_and_duplicate_names(tmp_path, monkeypatch):
    """A `.yml` card is found by name; `x.ONNX` is a model, not a card to decode; two cards of
    one name in a folder say which is used (they resolved silently)."""
    import shutil
    import warnings

    from conftest import build_brightness_model, write_test_card

    from napari_sam2unet.models import ModelCardWarning, find_model, load_card

    folder = tmp_path / "models"
    folder.mkdir()
    card = write_test_card(build_brightness_model(folder / "bright.onnx"))
    card.card_path.rename(folder / "bright.yml")
    monkeypatch.setenv("SAM2UNET_MODELS", str(folder))
    assert find_model("bright").file == folder / "bright.onnx"
    upper = tmp_path / "plain.ONNX"
    shutil.copy(folder / "bright.onnx", upper)
    assert load_card(upper).file == upper and find_model(str(upper)).name == "plain"
    shutil.copy(folder / "bright.yml", folder / "bright-copy.yaml")  # names the same model: bright
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_model("bright").card_path == folder / "bright-copy.yaml"  # sorted: the first
    said = [str(w.message) for w in caught if issubclass(w.category, ModelCardWarning)]
    assert len(said) == 1 and "bright.yml" in said[0] and "'bright'" in said[0], said


@pytest.mark.skipif(os.geteuid() == 0, reason="root searches any folder; test_unprivileged.py runs this as nobody")
def test_an_input_in_a_folder_the_user_cannot_search_says_permission(tmp_path, capsys):
    folder = tmp_path / "closed"
    folder.mkdir()
    (folder / "scan.nii.gz").write_bytes(open(MR, "rb").read())
    folder.chmod(0o600)  # readable names, but not searchable
    try:
        assert main(["segment", str(folder / "scan.nii.gz"), "--out", str(tmp_path / "out.nii.gz")]) == 2
    finally:
        folder.chmod(0o700)
    _one_line(capsys.readouterr().err, "permission denied")
    assert not (tmp_path / "out.nii.gz").exists()


def test_no_help_text_shows_a_doubled_percent_sign(capsys):
    """`eval --help` printed "10%%": argparse halves %% in help= but not in description=."""
    from napari_sam2unet.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name in commands.choices:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "%%" not in capsys.readouterr().out, name


@pytest.mark.parametrize("name, content, words", [
    ("empty.csv", "", "no 'image' column"),
    ("m.json", '[{"image": "a.nii.gz", "box": 5}]', '"box" must be text'),
    ("m.json", '[{"image": "a.nii.gz", "point": [3]}]', '"point" must be text'),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nests its JSON too deeply"),
])
def test_batch_manifest_mistakes_are_one_line(tmp_path, capsys, name, content, words):
    (tmp_path / name).write_text(content)
    assert main(["batch", str(tmp_path / name), "--out-dir", str(tmp_path / "out")]) == 2
    _one_line(capsys.readouterr().err, words)
    assert not (tmp_path / "out").exists()


def test_a_dangling_link_as_out_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    import napari_sam2unet.models as models

    monkeypatch.setattr(models, "find_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out.nii.gz"
    out.symlink_to(tmp_path / "gone" / "labels.nii.gz")
    assert main(["segment", MR, "--out", str(out), "--box", "10:10,10,40,40"]) == 2
    _one_line(capsys.readouterr().err, "link to nothing")
    assert out.is_symlink() and not (tmp_path / "gone").exists()


def test_ctrl_c_while_the_commands_load_is_one_line(capsys, monkeypatch):
    import napari_sam2unet.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["info"]) == 130
    _one_line(capsys.readouterr().err, "interrupted", "nothing was written")


@pytest.mark.parametrize("name", ["deep.json", "deep.yaml"])
def test_train_data_nested_too_deeply_is_one_line(tmp_path, capsys, name):
    pytest.importorskip("torch", reason="train needs torch (the [train] extra)")
    (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000)
    assert main(["train", "--data", str(tmp_path / name), "--out-dir", str(tmp_path / "run"), "--steps", "1"]) == 2
    _one_line(capsys.readouterr().err, name)


def test_a_name_in_two_model_folders_warns_once_naming_both_and_the_first_folder_wins(tmp_path, monkeypatch, capsys):
    """$SAM2UNET_MODELS is searched before the bundled models (as PATH is): a card there with the
    bundled model's name is the one used, and one warning names both files (it resolved silently)."""
    from conftest import build_brightness_model

    from napari_sam2unet.models import DEFAULT_MODEL, bundled_models_dir, card_fields, find_model, write_card

    bundled = find_model(DEFAULT_MODEL)
    mine = tmp_path / "mine"
    mine.mkdir()
    onnx_file = build_brightness_model(mine / "bright.onnx")
    write_card({**card_fields(onnx_file, name=DEFAULT_MODEL), "licence": "test model"}, mine / "my-compact.yaml")
    monkeypatch.setenv("SAM2UNET_MODELS", str(mine))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert main(["models"]) == 0
    out, err = capsys.readouterr()
    assert f"{DEFAULT_MODEL} (default): {onnx_file}" in out
    assert err.count("\n") == 1 and "two folders have a model named" in err, err
    assert str(mine / "my-compact.yaml") in err and str(bundled_models_dir() / bundled.card_path.name) in err
    assert "give its path as the model" in err
    assert main(["models"]) == 0  # once a process, not at every lookup
    assert capsys.readouterr().err == ""


def test_a_card_with_a_propagation_prior_outside_0_to_1_is_one_line(tmp_path, prompted_card, real_data, capsys):
    import yaml

    path = prompted_card.card_path
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "propagation_prior": 4}))
    out = tmp_path / "out.nii.gz"
    code = main(["segment", str(real_data / "totalseg" / "example_mr_sm.nii.gz"), "--box", "10:8,21,43,71",
                 "--scope", "propagate", "--model", str(path), "-o", str(out)])
    assert code == 2 and not out.exists()
    _one_line(capsys.readouterr().err, "propagation_prior", "4", "[0, 1]")

"""A checkpoint is data: a pickle that would run code when loaded is refused in one line."""

import builtins

import pytest

torch = pytest.importorskip("torch", reason="checkpoints need the [train] extra (torch)")

from napari_sam2unet.cli import build_parser, main  # noqa: E402
from napari_sam2unet.errors import InputError  # noqa: E402
from napari_sam2unet.training import finetune as ft  # noqa: E402
from napari_sam2unet.training import train as tr  # noqa: E402


class _Payload:
    """Unpickled with torch's default unpickler, this creates `marker`: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _malicious(path, marker):
    """A file shaped like a run's checkpoint whose weights are a payload."""
    torch.save({"ema": _Payload(marker), "args": {"arch": "unet", "config": "compact"}, "step": 1}, path)
    return path


def test_the_payload_runs_when_loaded_unsafely(tmp_path):
    # the test's own check: without weights_only the payload does create the marker
    marker = tmp_path / "ran"
    torch.load(_malicious(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("entry", ["finetune --base", "train --teacher", "train --resume", "train --export-only"])
def test_a_malicious_checkpoint_runs_no_code_anywhere(tmp_path, capsys, entry):
    marker = tmp_path / "ran"
    out = tmp_path / "run"
    out.mkdir()
    if entry == "finetune --base":
        with pytest.raises(InputError, match="--base .*loading it could run code"):
            ft.load_base(_malicious(tmp_path / "evil.pt", marker))
    elif entry == "train --teacher":
        with pytest.raises(InputError, match="--teacher .*loading it could run code"):
            tr.load_teacher(_malicious(tmp_path / "evil.pt", marker), "cpu")
    elif entry == "train --resume":
        _malicious(out / "last.pt", marker)
        args = build_parser().parse_args(["train", "--arch", "unet", "--out-dir", str(out), "--resume"])
        with pytest.raises(InputError, match="--resume .*loading it could run code"):
            tr._start_run(torch, args, torch.device("cpu"), out)
    else:
        _malicious(out / "best.pt", marker)
        code = main(["train", "--export-only", "--out-dir", str(out), "--export", str(tmp_path / "m.onnx")])
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "loading it could run code" in err[0], err
        assert not (tmp_path / "m.onnx").exists()
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", b"PK\x03\x04truncated"])
def test_a_base_that_is_not_a_checkpoint_gets_one_line(tmp_path, content):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match="--base .* is not a PyTorch checkpoint"):
        ft.load_base(path)


def test_a_checkpoint_holding_a_list_is_named(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(InputError, match="holds a list, not a state dict"):
        tr.load_teacher(tmp_path / "list.pt", "cpu")


def test_a_runs_last_checkpoint_resumes_with_weights_only(tmp_path):
    # everything last.pt holds (optimiser state, RNG state, history, args) is plain data
    out = tmp_path / "run"
    out.mkdir()
    args = build_parser().parse_args(_argv(out))
    run = tr._start_run(torch, args, torch.device("cpu"), out)
    loss = run.model(torch.rand(1, 3, 32, 32))[0].mean()
    loss.backward()
    run.opt.step()
    run.step, run.history = 1, [{"step": 1, "loss": 0.5}]
    tr._save_atomic(torch, run.checkpoint(torch, args), out / "last.pt")
    resumed = tr._start_run(torch, build_parser().parse_args([*_argv(out), "--resume"]), torch.device("cpu"), out)
    assert resumed.step == 1 and resumed.history == [{"step": 1, "loss": 0.5}]
    assert resumed.opt.state_dict()["state"]  # the optimiser's moments came back


def _argv(out):
    return ["train", "--arch", "unet", "--out-dir", str(out), "--lr", "1e-3"]

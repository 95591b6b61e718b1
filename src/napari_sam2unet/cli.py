"""The `sam2unet` command: segment, models, info; npu, export, train, eval, finetune, batch where present."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import platform
import shlex
import signal
import sys
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from .backends import BACKEND_CHOICES
from .engine import SCOPES
from .errors import Cancelled, Sam2UnetError, Terminated
from .options import check_threads
from .preprocess import WINDOW_CHOICES
from .segment_case import SegmentOptions
from .terminal import progress_bar

DEFAULTS = SegmentOptions()

# Subcommands whose code lives beside the modules they drive: (module, add-parser function).
_EXTRA_COMMANDS = [
    ("napari_sam2unet.convert.qnn_build", "add_npu_parser"),
    ("napari_sam2unet.convert.export", "add_export_parser"),
    ("napari_sam2unet.training.train", "add_train_parser"),
    ("napari_sam2unet.training.evaluate", "add_eval_parser"),
    ("napari_sam2unet.training.finetune", "add_finetune_parser"),
    ("napari_sam2unet.batch", "add_batch_parser"),
]


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line and the hint, not ten lines of usage (subcommands inherit it)."""

    def error(self, message: str):
        if message.startswith("argument") and "expected one argument" in message:
            message += "; a value that starts with '-' needs '=', e.g. --window=-160:240"
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sam2unet", description="Segment MRI and CT volumes with SAM2-UNet.")
    parser.add_argument("--version", action="version", version=f"napari-sam2unet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    seg = commands.add_parser("segment", help="segment a NIfTI volume or DICOM series and write its label map")
    seg.add_argument("image", type=Path, help="input .nii or .nii.gz, or a DICOM series (folder, DICOMDIR)")
    seg.add_argument("--out", "-o", type=Path, required=True,
                     help="output label map: .nii.gz, .dcm (DICOM-SEG of a DICOM input) or .seg.nrrd (3D Slicer)")
    seg.add_argument("--series", default=None, help="DICOM: which series (number or UID) where a folder holds several")
    seg.add_argument("--box", action="append", default=[], metavar="K:I0,J0,I1,J1",
                     help="box on slice K: rows [I0, I1), columns [J0, J1) of the other two axes; repeat for more")
    seg.add_argument("--point", action="append", default=[], metavar="K:I,J[:neg]",
                     help="point on slice K; ':neg' removes the region under it; repeat for more. With a model "
                     "that sees prompts a point is a click: it adds to (or, ':neg', trims) the object there")
    seg.add_argument("--prior", type=Path, default=None, metavar="LABELS",
                     help="correct this label map (same grid as the image): each slice with --point is looked at "
                     "again with its mask there as the prior; other slices are kept. Needs a prompted model")
    seg.add_argument("--prior-label", type=int, default=None,
                     help="the label of --prior to correct (default: every non-zero voxel)")
    seg.add_argument("--axis", type=int, default=DEFAULTS.axis, choices=(0, 1, 2),
                     help="slice axis (default 2, the last)")
    seg.add_argument("--scope", default=DEFAULTS.scope, choices=SCOPES,
                     help="which slices: auto = all slices without prompts, between boxes on 2+ slices, "
                          "else the prompted slices")
    seg.add_argument("--model", default=DEFAULTS.model, help="model name or path to .onnx/.yaml (default: bundled)")
    seg.add_argument("--backend", default=DEFAULTS.backend, choices=BACKEND_CHOICES)
    seg.add_argument("--threads", type=int, default=DEFAULTS.threads, help="CPU threads (default: all cores)")
    seg.add_argument("--window", default=DEFAULTS.window,
                     help=f"intensity window: {', '.join(WINDOW_CHOICES)} or LOW:HIGH")
    seg.add_argument("--threshold", type=float, default=DEFAULTS.threshold,
                     help="probability threshold (default: the model card's)")
    seg.add_argument("--label", type=int, default=DEFAULTS.label,
                     help="label value written for the structure (default 1)")
    seg.add_argument("--volume-index", type=int, default=DEFAULTS.volume_index,
                     help="for 4D images: which volume (default 0)")
    seg.add_argument("--replace-nonfinite", action="store_true", help="treat NaN/Inf voxels as the lowest intensity")
    seg.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    seg.add_argument("--no-sidecar", action="store_true", help="do not write the provenance .json beside --out")
    seg.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    seg.set_defaults(func=run_segment)

    models = commands.add_parser("models", help="list the models found and where")
    models.set_defaults(func=run_models)
    info = commands.add_parser("info", help="versions and available backends")
    info.add_argument("--model", default=None, help="model to check backends for (default: bundled)")
    info.set_defaults(func=run_info)

    for module_name, function in _EXTRA_COMMANDS:
        if importlib.util.find_spec(module_name.rsplit(".", 1)[0]) and _has_module(module_name):
            getattr(importlib.import_module(module_name), function)(commands)
    return parser


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def run_segment(args: argparse.Namespace) -> int:
    from .io import read_volume
    from .prompts import Prompts, parse_box, parse_point
    from .seg_formats import check_output, write_segmentation
    from .segment_case import BackendPool, Opened, Segmented, segment_volume

    if not 0 < args.label <= 65535:
        raise Sam2UnetError(f"--label {args.label} is out of range; use 1 to 65535")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise Sam2UnetError(f"--threshold {args.threshold} must lie between 0 and 1")
    check_threads(args.threads)  # shared with finetune and train
    prompts = Prompts([parse_box(b) for b in args.box], [parse_point(p) for p in args.point])
    _check_finite_prompts(args.box, prompts.boxes, args.point, prompts.points)
    if args.scope in ("slices", "between", "propagate") and not prompts:
        raise Sam2UnetError(f"--scope {args.scope} starts from prompts: give a --box or --point "
                            f"(or --scope auto to segment every slice)")
    options = options_from_args(args)
    volume = read_volume(args.image, options.volume_index, series=args.series)
    prompts.validate(volume.data.shape, options.axis)  # a slice out of range is said before the model loads
    prior = _read_prior(args, volume, prompts)
    # Fail before minutes of work, not after: existing files, the sidecar, a folder we cannot write.
    check_output(args.out, volume, args.overwrite, sidecar=not args.no_sidecar)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    for note in volume.notes:
        say(f"note: {note}")
    extra = {} if args.prior is None else {"corrected": str(args.prior.resolve()), "prior_label": args.prior_label}
    with BackendPool() as pool, progress_bar(args.quiet or prior is not None, "slice") as bar:

        def show(event) -> None:
            if isinstance(event, Opened):
                backend = event.engine.backend
                line = f"model {backend.card.name} on {backend.device}{_brief_reason(args.backend, backend, event.why)}"
                if bar is not None:  # through the bar, so the line does not land in the middle of it
                    bar.write(line, file=sys.stderr)
                else:
                    say(line)
            elif isinstance(event, Segmented) and bar is not None:
                bar.total, bar.n = event.total, event.done
                bar.refresh()

        labels, result, record = segment_volume(volume, prompts, options, pool, source=args.image, prior=prior,
                                                record_extra=extra, on_event=show)
    model = record["model"]
    write_segmentation(args.out, labels, volume, None if args.no_sidecar else record, overwrite=args.overwrite,
                       algorithm=(model["name"], model["sha256"] or ""))
    voxels = int(result.mask.sum())
    model_share = 100 * result.backend_seconds / max(result.total_seconds, 1e-9)
    say(f"segmented {len(result.slices)} slices in {result.total_seconds:.2f} s "
        f"({1000 * result.seconds_per_slice:.0f} ms/slice, model {model_share:.0f}%);"
        f" {voxels} voxels labelled {args.label}; wrote {args.out}")
    if voxels == 0:
        say("warning: nothing was segmented; check the prompts, --window or a lower --threshold")
    return 0


def options_from_args(args: argparse.Namespace) -> SegmentOptions:
    """`sam2unet segment`'s flags as the options every way of segmenting takes."""
    return SegmentOptions(axis=args.axis, scope=args.scope, window=args.window, threshold=args.threshold,
                          label=args.label, volume_index=args.volume_index,
                          replace_nonfinite=args.replace_nonfinite, model=args.model, backend=args.backend,
                          threads=args.threads)


def _read_prior(args, volume, prompts):
    """--prior as a boolean volume on the image's grid, or None; refused before any work."""
    from .io import read_volume

    if args.prior is None:
        if args.prior_label is not None:
            raise Sam2UnetError("--prior-label needs --prior LABELS, the label map to correct")
        return None
    if not prompts.points:
        raise Sam2UnetError("--prior needs at least one --point: the clicks that correct it")
    labels = read_volume(args.prior)
    if labels.data.shape != volume.data.shape:
        raise Sam2UnetError(f"--prior {args.prior.name} is {'x'.join(map(str, labels.data.shape))} voxels, the image "
                            f"{'x'.join(map(str, volume.data.shape))}: give a label map on the image's grid")
    if not np.allclose(labels.affine, volume.affine, atol=1e-3):
        raise Sam2UnetError(f"--prior {args.prior.name} is not aligned with the image (their affines differ); "
                            f"resample it onto the image's grid first")
    data = np.asarray(labels.data)
    return data != 0 if args.prior_label is None else data == args.prior_label


def _check_finite_prompts(box_texts, boxes, point_texts, points) -> None:
    for text, box in zip(box_texts, boxes):
        if not all(math.isfinite(v) for v in box.rect):
            raise Sam2UnetError(f"--box {text}: corners must be numbers (voxel indices), not nan or inf")
    for text, point in zip(point_texts, points):
        if not (math.isfinite(point.i) and math.isfinite(point.j)):
            raise Sam2UnetError(f"--point {text}: coordinates must be numbers (voxel indices), not nan or inf")


def _brief_reason(asked: str, backend, why: str) -> str:
    """Why this backend, in a few words: the long NPU explanation lives in `sam2unet info`."""
    if backend.name != "cpu" or asked != "auto":
        return f": {why}"
    return " (NPU not used: `sam2unet info` says why)" if backend.card.npu else ""


def run_models(args: argparse.Namespace) -> int:
    from .models import DEFAULT_MODEL, list_models, search_dirs

    cards = list_models()
    print("searched: " + ", ".join(str(d) for d in search_dirs()))
    if not cards:
        print("no models found")
        return 1
    for card in cards:
        mark = " (default)" if card.name == DEFAULT_MODEL else ""
        shape = "x".join("N" if d < 1 else str(d) for d in card.input.shape)
        npu = f", NPU: {', '.join(b.file.name for b in card.npu)}" if card.npu else ""
        print(f"{card.name}{mark}: {card.file} input {shape} {card.input.layout}, "
              f"crop {card.input.crop}, channels {card.input.channels}, threshold {card.threshold}{npu}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    import numpy
    import onnxruntime

    from .backends import explain_auto
    from .backends import qnn_runtime as qnn
    from .errors import ModelError
    from .models import find_model

    print(f"napari-sam2unet {__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__} "
          f"(providers: {', '.join(onnxruntime.get_available_providers())})")
    for name in ("torch", "napari", "aidlite"):
        found = importlib.util.find_spec(name) is not None
        print(f"{name}: {'installed' if found else 'not installed'}")
    print(f"qnn: {qnn.describe()}" if qnn.installed() else f"qnn: not installed ({qnn.INSTALL_HINT})")
    try:
        card = find_model(args.model)
    except ModelError as error:
        print(f"model: {error}")
        return 1
    print(f"model: {card.name} ({card.file})")
    print("backend auto ->", explain_auto(card))
    return 0


def _on_sigterm(signum, frame):
    raise Terminated()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"sam2unet: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports the commands' modules: Ctrl-C may come here
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        return _stopped("interrupted", 130, [])
    # Recorded in the model cards that `train` writes, so a model says how it was made.
    args.command_line = shlex.join(["sam2unet", *(sys.argv[1:] if argv is None else argv)])
    previous = _install_sigterm()
    before = len(_published())
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line, not a file name and a source line
            return args.func(args)
    except Cancelled as error:
        print(f"sam2unet: {error}", file=sys.stderr)
        return error.exit_code
    except Terminated:
        return _stopped("terminated", 143, _published()[before:])
    except KeyboardInterrupt:
        return _stopped("interrupted", 130, _published()[before:])
    except Sam2UnetError as error:
        print(f"sam2unet: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `sam2unet info | head -3`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _published() -> list[Path]:
    """The files this process published (atomic keeps the list; not imported means none)."""
    atomic = sys.modules.get("napari_sam2unet.atomic")
    return atomic.published_files() if atomic else []


def _stopped(what: str, code: int, written: list[Path]) -> int:
    """The message and exit code of a stopped command say what is on disk: 0 when its output was
    complete before the signal came (files are published whole or not at all), else `code`."""
    if written:
        names = " and ".join(str(path) for path in written)
        print(f"sam2unet: {what} after writing {names}, which are complete", file=sys.stderr)
        return 0
    print(f"sam2unet: {what}; nothing was written (existing files were kept)", file=sys.stderr)
    return code


def _install_sigterm():
    """Handle SIGTERM in the main thread (the previous handler is returned, to put back)."""
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        return None


if __name__ == "__main__":
    sys.exit(main())

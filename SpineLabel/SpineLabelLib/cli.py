"""``spinelabel``: label spine images, make phantoms, train and evaluate models from the command line.

Heavy modules (torch, SimpleITK) are imported inside the commands so that ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from . import __version__

log = logging.getLogger("spinelabel")
MAX_FILE_NAME_BYTES = 255  # the longest file name ext4 and APFS take (NTFS: 255 UTF-16 units, never fewer)


@contextlib.contextmanager
def _progress_bar(desc: str, quiet: bool) -> Iterator[Callable[[float, str], None]]:
    """A progress bar on stderr named ``desc`` (none when ``quiet`` or stderr is no terminal), removed on exit; yields
    the ``progress`` hook of the library (fraction 0-1 of the job, message) that moves it."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=100, desc=desc, disable=True if quiet else None, leave=False,  # None: none where not a terminal
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")

    def progress(fraction: float, message: str) -> None:
        bar.n = int(100 * fraction)
        bar.set_postfix_str(message, refresh=True)

    try:
        with logging_redirect_tqdm():  # log lines go above the bar instead of into it
            yield progress
    finally:
        bar.close()


def _label(args: argparse.Namespace) -> int:
    from .io import no_empty_new_folders

    with no_empty_new_folders(args.out):  # every input failed, or the run was stopped: no trace of this run
        return _label_files(args.inputs, args.out, args)[0]


def _resolved(path: Path) -> Path:
    """``path`` resolved; as an absolute path where it cannot be (a symlink loop: that input fails on its own)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _label_files(inputs: list[Path], out: Path, args: argparse.Namespace, modalities: dict[Path, str] | None = None
                 ) -> tuple[int, list[Path]]:
    """Label each input into the folder ``out`` with the options of ``args`` (``_add_labelling_options``, quiet,
    debug), an input in ``modalities`` as the modality given there (``"ct"``, ``"mr"``). Returns the exit status (0
    all labelled, 1 some failed, 2 no output folder, no model, or an output that would replace an input) and the
    inputs that failed."""
    from .inference import reuse_freed_memory
    from .io import InputError, case_name, folder_lock, make_writable_folder, read_image
    from .models import ModelError
    from .pipeline import get_model, label_spine, require_vertebrae
    from .writers import check_replaceable, output_paths, report_path, write_all

    reuse_freed_memory()
    once: dict[Path, Path] = {}
    for path in inputs:  # the same file or folder given twice, spelt alike or not
        first = once.setdefault(_resolved(path), path)
        if first is not path and not args.quiet:
            same = "given more than once" if first == path else f"is {first}, given before"
            print(f"spinelabel: {path} {same}: labelled once", file=sys.stderr)
    inputs = list(once.values())
    first_of: dict[str, Path] = {}
    for path in inputs:  # names that differ only in case are one file on Windows and macOS
        other = first_of.setdefault(case_name(path).casefold(), path)
        if other != path:
            print(f"spinelabel: error: {other} and {path} would both write {out / case_name(path)}*; label them into "
                  "different folders", file=sys.stderr)
            return 2, []
    given = {_resolved(path): path for path in inputs}
    for path in inputs:
        for output in output_paths(out, case_name(path)):
            if (replaced := given.get(_resolved(output))) is not None:
                print(f"spinelabel: error: {output} would replace the input {replaced}; choose another output folder",
                      file=sys.stderr)
                return 2, []
        try:  # found now, not after labelling; under the lock, as another run's renames half done look foreign
            with folder_lock(out):
                check_replaceable(out, case_name(path))
        except FileExistsError as err:
            print(f"spinelabel: error: {err}; choose another output folder", file=sys.stderr)
            return 2, []
        except OSError as err:  # a name too long for the file system, a folder that cannot be read
            print(f"spinelabel: error: {out}: output folder not writable ({err.strerror or err})", file=sys.stderr)
            return 2, []
    if out.exists() and not out.is_dir():
        print(f"spinelabel: error: {out}: is a file, not an output folder", file=sys.stderr)
        return 2, []
    try:
        make_writable_folder(out)
    except OSError as err:
        print(f"spinelabel: error: {out}: output folder not writable ({err.strerror or err})", file=sys.stderr)
        return 2, []
    try:
        model = get_model(args.model, args.device)
    except (ModelError, RuntimeError) as err:
        print(f"spinelabel: error: {err}", file=sys.stderr)
        return 2, []
    failed: list[Path] = []
    for path in inputs:
        image = result = failure = None  # the last input's arrays freed before this one is read
        started = time.perf_counter()  # said with its result: reading and writing included, as a user times it
        with _progress_bar(case_name(path), args.quiet) as progress:
            try:
                if not case_name(path):
                    raise InputError(f"{path}: the file name has nothing before its extension to name the outputs "
                                     "by; rename it")
                longest = max((p.name for p in output_paths(out, case_name(path))), key=lambda n: len(os.fsencode(n)))
                if len(os.fsencode(longest)) > MAX_FILE_NAME_BYTES:  # found before the labelling, not after it
                    raise InputError(f"{path}: its output {longest} would be a file name of more than "
                                     f"{MAX_FILE_NAME_BYTES} bytes, which file systems refuse; give the input a "
                                     "shorter name")
                image = read_image(path)
                result = label_spine(image, model=model, device=args.device, progress=progress,
                                     check_orientation=args.check_orientation, spine_gate=not args.no_spine_gate,
                                     modality=(modalities or {}).get(path, args.modality))
                result.source = str(path)
                require_vertebrae(result, path)
                written = write_all(result, image, out, case_name(path), input_path=path)
            except Exception as err:  # this input failed; the others still run
                if args.debug:
                    log.exception("failed: %s", path)
                reason = str(err) or type(err).__name__
                failure = reason if str(path) in reason else f"{path}: {reason}"
                # os.path: False, not an error, for a name too long for the file system
                earlier = [p for p in output_paths(out, case_name(path)) if os.path.exists(p)]
                if earlier:  # not this run's: say so, and leave them as they are; without the report beside them
                    # they are no earlier run's outputs but someone else's files (check_replaceable)
                    whose = (f"the outputs of an earlier run in {out}" if report_path(out, case_name(path)) in earlier
                             else f"the files in {out} of its outputs' names, no earlier run's outputs,")
                    failure += f"; {whose} were left as they were: " + ", ".join(p.name for p in earlier)
        if failure is not None:  # once its progress bar is gone: one line of its own
            failed.append(path)
            print(f"spinelabel: failed: {failure}", file=sys.stderr)
            continue
        if not args.quiet:
            names, count = " ".join(v.name for v in result.vertebrae) or "none", len(result.vertebrae)
            elapsed = time.perf_counter() - started
            print(f"{path}: {count} vertebra{'e' * (count != 1)} ({names}) in {elapsed:.1f} s, as "
                  f"{result.modality} -> {written[0].parent}")
            for warning in result.warnings:
                print(f"  warning: {warning}")
    if failed and len(inputs) > 1:  # the failures' lines may lie far above, among the others' output
        print(f"spinelabel: {len(inputs) - len(failed)} of {len(inputs)} inputs labelled; failed: "
              + ", ".join(map(str, failed)), file=sys.stderr)
    return (1 if failed else 0), failed


def _phantom(args: argparse.Namespace) -> int:
    from .phantom import make_phantom

    phantom = make_phantom(modality=args.modality, fov=args.fov, size=args.size, spacing=args.spacing, seed=args.seed)
    for path in phantom.save(args.output):
        if not args.quiet:
            print(path)
    return 0


def _models(args: argparse.Namespace) -> int:
    from .models import list_models

    for card in list_models():  # a registered model by its file's name, which --model finds (a card copied in by
        # hand may hold another)
        print(f"{Path(card['path']).stem}\t{card['version']}\t{card['path']}")
    return 0


def _data_source(spec: str) -> tuple[str, float]:
    """``SOURCE[:WEIGHT]`` -> (source, weight); a tail after ``:`` that is not a number is part of the source, and so
    is one after a folder that exists by the whole name (``export_12:30``)."""
    source, colon, weight = spec.rpartition(":")
    try:
        return (source, float(weight)) if colon and not Path(spec).exists() else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def _train(args: argparse.Namespace) -> int:
    from SpineLabelTrainingLib.training import TrainConfig, epoch_text, train

    from .inference import reuse_freed_memory

    reuse_freed_memory()
    if args.name is None:
        args.name = "spinelabel-finetuned" if args.base_model else "spinelabel-trained"
    cfg = TrainConfig(
        data=[_data_source(spec) for spec in args.data], out=args.out, base_model=args.base_model, name=args.name,
        version=args.version,
        epochs=args.epochs, iterations=args.iterations, batch=args.batch, patch=tuple(args.patch), lr=args.lr,
        spacing_mm=args.spacing, device=args.device, seed=args.seed, resume=args.resume, data_dir=args.data_dir,
        training_data_note=args.note, validation_cases=args.validation_cases, average_last=args.average_last,
        tilt_deg=args.tilt_deg, short_window=args.short_window,
        progress_bars=False if args.quiet else True if args.progress_bars else None,
    )

    def progress(m: dict) -> None:
        if not args.quiet:
            print(epoch_text(m), flush=True)

    if args.register:  # refused now rather than after the training
        from .models import ModelError, registration_path

        try:
            registration_path(args.name)
        except ModelError as err:
            print(f"spinelabel: error: {err}; choose another --name", file=sys.stderr)
            return 2
    card = train(cfg, progress=progress)
    print(card)
    if args.register:
        from .models import register_model

        print(register_model(card))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import check_report_paths, evaluate_folders, labelled_cases, summary_markdown
    from .export import recorded_modality
    from .io import InputError, case_key, case_name, no_empty_new_folders
    from .writers import output_paths

    status, fresh = 0, None
    given = [option for option, value, default in (
        ("--model", args.model, None), ("--device", args.device, "auto"), ("--modality", args.modality, "auto"),
        ("--check-orientation", args.check_orientation, False), ("--no-spine-gate", args.no_spine_gate, False))
        if value != default]
    if given and not args.label:
        verb = "applies" if len(given) == 1 else "apply"
        print(f"spinelabel: error: {', '.join(given)} only {verb} with --label (which labels the reference images)",
              file=sys.stderr)
        return 2
    if args.label:
        cases = labelled_cases(args.gt_dir)
        if not cases:
            raise InputError(f"{args.gt_dir}: no reference case has its image beside it: nothing to label")
        check_report_paths([p for p in (args.json, args.markdown) if p is not None],  # before any labelling
                           [p for image, gt in cases
                            for p in (image, gt.mask, gt.ctd, *output_paths(args.pred_dir, case_name(image)))],
                           args.pred_dir, args.gt_dir)
        # an exported case as its export was labelled (the user's choice of modality, where auto would differ)
        recorded = {image: m.lower() for image, gt in cases if (m := recorded_modality(gt.mask)) is not None
                    } if args.modality == "auto" else {}
        with no_empty_new_folders(args.pred_dir):
            status, failed = _label_files([image for image, _ in cases], args.pred_dir, args, recorded)
        if status == 2:
            return status
        # only this run's predictions are scored: a case it did not label (its image failed, or it has none) is not
        # predicted, whatever an earlier run left in PRED_DIR
        fresh = {case_key(case_name(image)) for image, _ in cases if image not in failed}
        if not fresh:
            print(f"spinelabel: error: no reference case of {args.gt_dir} could be labelled", file=sys.stderr)
            return 1
    with _progress_bar("scoring", args.quiet) as progress:
        summary = evaluate_folders(args.pred_dir, args.gt_dir, out_json=args.json, out_md=args.markdown,
                                   progress=progress, fresh=fresh)
    if not args.quiet:
        print(summary_markdown(summary))
    return status


def _path(text: str) -> Path:
    """A path argument; an empty one is refused (``Path("")`` would be the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names no file or folder")
    return Path(text)


def _add_labelling_options(p: argparse.ArgumentParser, scope: str = "") -> None:
    """The options that ``_label_files`` reads (model, device, orientation check, spine gate, modality); ``scope``
    opens their help."""
    p.add_argument("--model", type=_path, help=scope + "model card (.json) or a model's name (spinelabel models); "
                   "default: the model shipped with SpineLabel")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help=scope + "where the network runs (default auto: a CUDA GPU when there is one)")
    p.add_argument("--check-orientation", action="store_true",
                   help=scope + "read the vertebrae's levels a second time with each image turned head to feet and "
                        "warn when they read better that way (a wrong header); about half the network time again")
    p.add_argument("--no-spine-gate", action="store_true",
                   help=scope + "label the vertebra-like parts even where the network does not take the image for a "
                        "spine (a spine it does not recognise: a small or unusual field of view)")
    p.add_argument("--modality", default="auto", choices=["auto", "ct", "mr"],
                   help=scope + "CT (Hounsfield units) or MR; auto: CT when the image holds air, or fat and bone, in "
                        "Hounsfield units")


def _add_output_options(p: argparse.ArgumentParser, quiet: str = "no progress bar or summary") -> None:
    """The options that ``main`` reads to set the log level and the output (quiet, verbose, debug); ``quiet`` is what
    --quiet leaves out."""
    p.add_argument("--quiet", action="store_true", help=quiet)
    p.add_argument("--verbose", action="store_true", help="also log what each step did")
    p.add_argument("--debug", action="store_true", help="debug log, and tracebacks for failures")


_EXIT_STATUS = ("exit status: 0 done; 1 an input failed (a line each, naming the file and the reason) or another "
                "error; 2 refused before any labelling (a wrong option, no model, an output folder that is a file or "
                "not writable, two inputs of one name, an output that would replace an input or a file no earlier run "
                "wrote); 130 Ctrl-C; 128 + N on signal N (143 SIGTERM)")
_EVALUATE_EXIT_STATUS = ("exit status: 0 done; 1 a folder, file or report path refused (one line naming it and the "
                         "reason), an input --label could not label, or another error; 2 a wrong option, or with "
                         "--label refused before any labelling as spinelabel label refuses; 130 Ctrl-C; 128 + N on "
                         "signal N (143 SIGTERM)")
_TRAIN_EXIT_STATUS = ("exit status: 0 done; 1 refused or failed (one line naming the file or option and the reason: a "
                      "--data folder or case, a setting, --out, a checkpoint --resume cannot continue, a run that "
                      "diverged) or another error; 2 a wrong option, or a --name --register cannot register; 130 "
                      "Ctrl-C; 128 + N on signal N (143 SIGTERM); a run stopped after an epoch names the checkpoint "
                      "that --resume continues from")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinelabel", description="Label every vertebra of a CT or MRI spine scan.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("label", help="label spine images", description="Label every vertebra of each input. "
                       "Writes NAME_seg.nii.gz, NAME.seg.nrrd, NAME.mrk.json, NAME_ctd.json, NAME_report.json and "
                       "NAME_snapshot.png into OUTDIR for each input.", epilog=_EXIT_STATUS)
    p.add_argument("inputs", nargs="+", type=_path, metavar="INPUT",
                   help="NIfTI, NRRD, MetaImage file, or a folder holding one DICOM series")
    p.add_argument("-o", "--out", type=_path, required=True, metavar="OUTDIR",
                   help="folder for the outputs (made if missing)")
    _add_labelling_options(p)
    _add_output_options(p)
    p.set_defaults(func=_label)

    p = sub.add_parser("phantom", help="write a procedural spine phantom and its label map",
                       description="Write a procedural spine phantom to OUT.nii.gz and its VerSe label map to "
                       "OUT_seg-vert_msk.nii.gz beside it (the VerSe layout that evaluate and train read).")
    p.add_argument("output", type=_path, metavar="OUT.nii.gz", help="the phantom image to write (NIfTI, NRRD or "
                   "MetaImage, by its suffix); its label map goes beside it")
    p.add_argument("--modality", default="ct", choices=["ct", "mr"], help="CT (Hounsfield units) or MR-like "
                   "intensities (default ct)")
    p.add_argument("--fov", default="whole", choices=["whole", "cervical", "thoracic", "lumbar"],
                   help="the region in view, neighbouring levels in part (default whole: C1 to the sacrum)")
    p.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="voxels; default: enough for the levels of --fov (fewer show fewer levels)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="mm; default: that of --fov")
    p.add_argument("--seed", type=int, default=0, help="another seed, another spine (default 0)")
    _add_output_options(p, "no summary")
    p.set_defaults(func=_phantom)

    p = sub.add_parser("models", help="list the shipped and the registered models",
                       description="List the model shipped with SpineLabel and those registered (train --register), "
                       "one per line: name, version, card. --model and --base-model take a model's name.")
    p.set_defaults(func=_models, quiet=False, verbose=False, debug=False)

    p = sub.add_parser("train", help="train or fine-tune a model",
                       description="Train a new model, or fine-tune one (--base-model), on a mix of the --data "
                       "sources. Writes the model card --out and its weights (.pt) beside it, and after every epoch a "
                       "checkpoint (.ckpt) and a line of loss and validation scores; prints the card's path at the "
                       "end (and with --register the registered card's).", epilog=_TRAIN_EXIT_STATUS)
    p.add_argument("--data", action="append", required=True, metavar="SOURCE[:WEIGHT]",
                   help="'synthetic', 'phantom', 'negative' (images without a spine), or a folder (nnU-Net "
                        "imagesTr/labelsTr, VerSe, *_img/*_vert-verse); repeat to mix")
    p.add_argument("--out", type=_path, required=True, help="model card to write (.json; weights beside it)")
    p.add_argument("--base-model", type=_path, help="fine-tune from this model card (or a model's name)")
    p.add_argument("--name", help="the model's name in its card (and registry); default spinelabel-finetuned with "
                   "--base-model, spinelabel-trained without")
    p.add_argument("--version", default="0.1.0", help="the model's version in its card (default %(default)s)")
    p.add_argument("--epochs", type=int, default=10,
                   help="each ends with a checkpoint and a validation line (default %(default)s)")
    p.add_argument("--iterations", type=int, default=100, help="iterations per epoch (default %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="crops per iteration (default %(default)s)")
    p.add_argument("--patch", type=int, nargs=3, default=[128, 80, 80], metavar=("Z", "Y", "X"),
                   help="crop size in model voxels, each a multiple of 16 (default 128 80 80)")
    p.add_argument("--lr", type=float, help="peak learning rate; default 2e-3 for a new model, 3e-4 to fine-tune")
    p.add_argument("--spacing", type=float,
                   help="model grid spacing in mm, new models only (default 2.0; a fine-tune keeps its base model's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where training runs (default auto: a CUDA GPU when there is one)")
    p.add_argument("--seed", type=int, default=0, help="of the crops drawn and the new weights (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    p.add_argument("--data-dir", type=_path, help="real labelled vertebrae, the shapes of --data synthetic (needed "
                   "only for it): a folder laid out like ../shared/data, whose masks_verse/, ct_verse/ or "
                   "crops_tptbox/ subfolders hold the whole-vertebra masks")
    p.add_argument("--validation-cases", type=int, default=4, help="fixed crops scored after every epoch, drawn "
                   "in turn from the --data sources of weight above 0 (for a folder: crops of its training scans; "
                   "default %(default)s)")
    p.add_argument("--note", default="", help="free text for the model card's training data entry")
    p.add_argument("--average-last", type=int, default=0, metavar="N",
                   help="write the mean of the weights of the last N epochs (stochastic weight averaging)")
    p.add_argument("--tilt-deg", type=float, default=0.0, metavar="DEG",
                   help="turn half the training crops about left-right by up to DEG degrees and about front-back by "
                   "up to DEG/2, for spines that lean against the slices (default 0: crops as drawn)")
    p.add_argument("--short-window", type=float, default=0.0, metavar="P",
                   help="cut this share of the training crops to a short head-feet window (30-110 mm) through a "
                   "vertebra, extended by its mirror image as labelling extends a scan that short (default 0)")
    p.add_argument("--register", action="store_true", help="also register the model under --name in the user model "
                   "folder ($SPINELABEL_MODELS_DIR), where the Slicer module lists it")
    p.add_argument("--progress-bars", action="store_true", help="draw the progress bars where the output is no "
                   "terminal too, for a program that reads them (the SpineLabelTraining module); not with --quiet")
    _add_output_options(p, "no progress bars or epoch lines")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="score predictions against reference labels (VerSe metrics)",
                       description="Score the predictions in PRED_DIR against the reference labels in GT_DIR. With "
                       "--label, first label into PRED_DIR the image of every reference case (the image file beside "
                       "its mask, or imagesTr/X_0000 for labelsTr/X); a case whose dataset.json records CT or MR is "
                       "labelled as that unless --modality says otherwise.", epilog=_EVALUATE_EXIT_STATUS)
    p.add_argument("pred_dir", type=_path, metavar="PRED_DIR", help="NAME_seg.nii.gz (+ NAME_ctd.json, "
                   "NAME_report.json) of each case, as spinelabel label writes them")
    p.add_argument("gt_dir", type=_path, metavar="GT_DIR", help="reference masks: VerSe (X_seg-vert_msk.nii.gz, "
                   "optionally X_seg-vb_ctd.json), bodies only (X_vert-verse.nii.gz) or nnU-Net (labelsTr/X.nii.gz + "
                   "dataset.json)")
    p.add_argument("--json", type=_path, metavar="OUT.json", help="write the per-case results and summary as JSON")
    p.add_argument("--markdown", type=_path, metavar="OUT.md", help="write the report as Markdown")
    p.add_argument("--label", action="store_true", help="label the reference images into PRED_DIR first")
    _add_labelling_options(p, "with --label: ")
    _add_output_options(p, "no progress bars or summary")
    p.set_defaults(func=_evaluate)
    return parser


class _Terminated(BaseException):
    """SIGTERM (``timeout``, a batch scheduler, a parent process) or SIGHUP (the terminal closed, a dropped ssh
    connection), raised where the process is, so that the temporary files of unfinished outputs are removed on the way
    out as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise _Terminated(signum)


# the signals that end a run as Ctrl-C does (SIGHUP is POSIX only)
_ENDING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a path the console's code page cannot print must not end the run
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:  # Ctrl-C this early (the imports take a second) ends the run as it does later: no traceback
        args = build_parser().parse_args(argv)
        from .io import itk_warnings
    except KeyboardInterrupt:
        print("spinelabel: interrupted", file=sys.stderr)
        return 130
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handles_signals = threading.current_thread() is threading.main_thread()  # where Python lets it set a handler
    # a signal ignored when the run started (nohup ignores SIGHUP) stays ignored
    previous = {sig: signal.signal(sig, _terminate) for sig in _ENDING
                if handles_signals and signal.getsignal(sig) is not signal.SIG_IGN}
    started = time.time() - 1.0  # a file's time comes from a coarser clock, up to a few milliseconds behind this one

    def resumable() -> str:  # a stopped training keeps the checkpoint of its last finished epoch beside --out
        if args.func is not _train:
            return ""
        from .models import checkpoint_path

        ckpt = checkpoint_path(args.out)
        # this run's checkpoint, or the one it resumed from: not one another run left there with other settings
        ours = ckpt.is_file() and (args.resume or ckpt.stat().st_mtime >= started)
        return f" (the same command with --resume continues from {ckpt})" if ours else ""

    try:
        with itk_warnings(not args.quiet):  # quiet: ITK's multi-line warnings too, so one line per failure
            return args.func(args)
    except KeyboardInterrupt:
        print("spinelabel: interrupted" + resumable(), file=sys.stderr)
        return 130
    except _Terminated as ended:
        print("spinelabel: terminated" + resumable(), file=sys.stderr)
        return 128 + ended.signum
    except Exception as err:  # one line per failure unless --debug
        if args.debug:
            raise
        # a write that failed (a full disk) keeps the checkpoint of the last finished epoch, as a stop does; a refused
        # setting or checkpoint (ValueError) would not be continued by --resume
        print(f"spinelabel: error: {err}" + (resumable() if isinstance(err, OSError) else ""), file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():  # None: a handler not set from Python
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


if __name__ == "__main__":
    sys.exit(main())

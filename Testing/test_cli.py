"""The spinelabel command line: outputs, exit status, one clear line per failure, nothing left behind."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SpineLabelLib.cli import main
from SpineLabelLib.io import case_name
from SpineLabelLib.models import DEFAULT_MODEL_NAME, ModelError, default_model_path
from SpineLabelLib.vertebrae import BY_NAME
from SpineLabelLib.writers import OUTPUT_SUFFIXES


@pytest.fixture(scope="module")
def model():
    """The shipped model's card: it finds the phantom's vertebrae, as the runs that write outputs need, on any CPU. A
    model of random weights found none with some seeds, and what it found, and the words of its warnings, changed
    with the CPU's vector instructions."""
    return default_model_path()


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "demo" / "spine.nii.gz"  # the folder does not exist yet
    assert main(["phantom", str(path), "--fov", "lumbar", "--spacing", "2", "2", "2.5", "--seed", "3", "--quiet"]) == 0
    assert path.exists() and (path.parent / "spine_seg-vert_msk.nii.gz").exists()
    return path


def test_label_writes_every_output(tmp_path, model, phantom_file, capsys):
    out = tmp_path / "out"
    argv = ["label", str(phantom_file), "-o", str(out), "--model", str(model), "--device", "cpu", "--no-spine-gate",
            "--modality", "mr"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted("spine" + s for s in OUTPUT_SUFFIXES)
    seg = sitk.ReadImage(str(out / "spine_seg.nii.gz"))
    ref = sitk.ReadImage(str(phantom_file))
    assert seg.GetSize() == ref.GetSize() and np.allclose(seg.GetOrigin(), ref.GetOrigin())
    report = json.loads((out / "spine_report.json").read_text())
    assert report["model"]["name"] == DEFAULT_MODEL_NAME and report["model"]["device"] == "cpu"
    assert "total" in report["timings_s"]
    assert report["model"]["sha256"] == json.loads(model.read_text())["sha256"]  # two models of one name told apart
    assert report["vertebrae"]
    assert report["input"]["modality"] == "MR"  # a CT phantom, labelled as MR because the user said so
    # the summary line names the vertebrae, and every warning of the report is shown, each on a line of its own
    lines = capsys.readouterr().out.splitlines()
    names = " ".join(v["name"] for v in report["vertebrae"])
    assert lines[0].startswith(f"{phantom_file}: {len(report['vertebrae'])} vertebrae ({names}) in ")
    assert report["warnings"]  # the CT phantom labelled as MR is warned of, at least
    assert lines[1:] == [f"  warning: {w}" for w in report["warnings"]]



def test_the_time_said_for_an_input_includes_reading_and_writing_it(tmp_path, model, phantom_file, capsys,
                                                                    monkeypatch):
    """'... in N s' gave the labelling's own time, without reading the image or writing the outputs: the 800-slice
    phantom said 30.4 s of a 39.9 s run."""
    import time

    import SpineLabelLib.io as io
    read_image = io.read_image
    monkeypatch.setattr(io, "read_image", lambda path: time.sleep(1.5) or read_image(path))
    argv = ["label", str(phantom_file), "-o", str(tmp_path), "--model", str(model), "--device", "cpu",
            "--no-spine-gate", "--modality", "mr"]
    assert main(argv) == 0
    said = float(capsys.readouterr().out.split(") in ")[1].split(" s, as ")[0])
    labelling = json.loads((tmp_path / "spine_report.json").read_text())["timings_s"]["total"]
    assert said >= labelling + 1.5

def test_evaluate_labels_the_reference_images_first(tmp_path, model, phantom_file):
    gt = tmp_path / "Dataset001"
    (gt / "imagesTr").mkdir(parents=True)
    (gt / "labelsTr").mkdir()
    (gt / "imagesTr" / "spine_0000.nii.gz").write_bytes(phantom_file.read_bytes())
    (gt / "labelsTr" / "spine.nii.gz").write_bytes((phantom_file.parent / "spine_seg-vert_msk.nii.gz").read_bytes())
    pred, summary = tmp_path / "pred", tmp_path / "summary.json"
    argv = ["evaluate", str(pred), str(gt), "--label", "--model", str(model), "--json", str(summary), "--quiet"]
    assert main(argv) == 0
    assert (pred / "spine_0000_seg.nii.gz").exists() and (pred / "spine_0000_report.json").exists()
    case = json.loads(summary.read_text())["cases"][0]
    assert case["name"] == "spine_0000" and not case["prediction_missing"] and case["n_gt"] >= 5


def test_version_and_log_levels(capsys):
    from SpineLabelLib import __version__
    from SpineLabelLib.cli import build_parser

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"spinelabel {__version__}"
    parser = build_parser()
    for command in (["label", "x", "-o", "o"], ["phantom", "x"], ["train", "--data", "phantom", "--out", "m.json"],
                    ["evaluate", "p", "g"]):  # every command takes the same output options
        args = parser.parse_args([*command, "--verbose", "--quiet", "--debug"])
        assert args.verbose and args.quiet and args.debug


def test_evaluate_shows_a_progress_bar_on_a_terminal_unless_quiet(tmp_path, capsys, monkeypatch):
    gt, pred = tmp_path / "Dataset001" / "labelsTr", tmp_path / "pred"
    gt.mkdir(parents=True)
    pred.mkdir()
    labels = np.zeros((40, 8, 8), dtype=np.uint8)
    labels[2:18, 2:6, 2:6], labels[22:38, 2:6, 2:6] = BY_NAME["L1"].label, BY_NAME["L2"].label
    for case in ("a", "b"):
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(gt / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(pred / f"{case}_seg.nii.gz"))
    assert main(["evaluate", str(pred), str(gt.parent)]) == 0
    captured = capsys.readouterr()  # stderr is no terminal here: no bar frames in a log file
    assert captured.err == "" and "| all | 2 | 4 | 1.00 |" in captured.out
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["evaluate", str(pred), str(gt.parent)]) == 0
    captured = capsys.readouterr()
    assert "scoring: 100%" in captured.err and "scored b" in captured.err
    assert "| all | 2 | 4 | 1.00 |" in captured.out
    assert main(["evaluate", str(pred), str(gt.parent), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def bad_inputs(tmp):
    (tmp / "notes.txt").write_text("not an image")
    (tmp / "trunc.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    sitk.WriteImage(sitk.Image([32, 32], sitk.sitkInt16), str(tmp / "flat.nii.gz"))
    sitk.WriteImage(sitk.Image([8, 8, 8, 2], sitk.sitkInt16), str(tmp / "four.nii.gz"))
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), str(tmp / "rgb.nrrd"))
    sitk.WriteImage(sitk.Image([24, 24, 24], sitk.sitkInt16), str(tmp / "blank.nii.gz"))  # readable, nothing to label
    (tmp / "loop").symlink_to("loop")
    sitk.WriteImage(sitk.Image([24, 24, 24], sitk.sitkInt16), str(tmp / ".nii.gz"))
    cases = {
        tmp / "missing.nii.gz": "no such file",
        tmp / "notes.txt": "unsupported file type",
        tmp / "trunc.nii.gz": "unreadable",
        tmp / "flat.nii.gz": "2D image",
        tmp / "four.nii.gz": "4D image",
        tmp / "rgb.nrrd": "RGB",
        tmp / "blank.nii.gz": "image is constant",
        tmp / "loop": "a link that leads back to itself",
        tmp / ".nii.gz": "nothing before its extension",  # refused before labelling, not when its outputs are named
    }
    undecodable = tmp / os.fsdecode(b"bad\xffname.nii.gz")  # ITK's readers abort the process on such a name
    try:
        undecodable.write_bytes(b"")
        cases[undecodable] = "not valid UTF-8"
    except OSError:  # a file system that takes UTF-8 names only
        pass
    return cases


def test_each_bad_input_fails_alone_with_a_clear_line(tmp_path, model, phantom_file, capsys):
    cases = bad_inputs(tmp_path)
    out = tmp_path / "out"
    argv = ["label", *map(str, cases), str(phantom_file), "-o", str(out), "--model", str(model), "--quiet",
            "--no-spine-gate", "--modality", "mr"]  # as in test_label_writes_every_output
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("spinelabel: failed")]
    assert len(lines) == len(cases)
    for path, reason in cases.items():
        shown = str(path).encode("utf-8", "backslashreplace").decode()  # as the console shows an undecodable name
        assert any(shown in line and reason in line for line in lines), (path, err)
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"spinelabel: 1 of {len(cases) + 1} inputs labelled; failed: ")
    names = {p.name for p in out.iterdir()}
    assert names == {"spine" + s for s in OUTPUT_SUFFIXES}  # the good input still ran; nothing of the bad ones
    assert main(["label", *map(str, cases), "-o", str(tmp_path / "none" / "a" / "b"), "--model", str(model),
                 "--quiet"]) == 1
    assert not (tmp_path / "none").exists()  # every input failed: not even the folders this run made are left


def test_ctrl_c_stops_the_run_with_status_130_and_leaves_nothing(tmp_path, model, phantom_file, monkeypatch, capsys):
    """Ctrl-C while an input is labelled stops the whole run (it is no failure of that input, to be passed over):
    one line, the shell's status for SIGINT (130, so that scripts and make stop too), and no output folder."""
    from SpineLabelLib import pipeline

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "label_spine", interrupted)
    second = tmp_path / "second.nii.gz"
    second.write_bytes(phantom_file.read_bytes())
    out = tmp_path / "run" / "out"
    argv = ["label", str(phantom_file), str(second), "-o", str(out), "--model", str(model), "--quiet"]
    assert main(argv) == 130 and len(calls) == 1  # the second input is not started
    err = capsys.readouterr().err
    assert err.strip() == "spinelabel: interrupted" and "failed" not in err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_the_command_line_is_read_gives_no_traceback(monkeypatch, capsys):
    """The first second of a run imports the libraries; Ctrl-C there printed Python's traceback."""
    from SpineLabelLib import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["label", "x.nii.gz"]) == 130 and capsys.readouterr().err.strip() == "spinelabel: interrupted"


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_terminated_run_leaves_nothing(tmp_path, model, phantom_file, monkeypatch, capsys, name):
    """SIGTERM (timeout, a batch scheduler) or SIGHUP (the terminal closed) while the outputs are being written:
    their temporary files are removed and so is the folder the run made, as for Ctrl-C."""
    from SpineLabelLib import io, writers

    if not hasattr(signal, name):
        pytest.skip(f"no {name} on this platform")
    sig = getattr(signal, name)
    before = signal.getsignal(sig)
    if before is signal.SIG_IGN:
        pytest.skip(f"{name} is ignored here (nohup), and stays so for spinelabel")

    def write_and_be_terminated(result, image, out, name, input_path=None):
        with io.atomic_paths([out / f"{name}_seg.nii.gz"]) as (tmp,):
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(writers, "write_all", write_and_be_terminated)
    out = tmp_path / "run" / "out"
    argv = ["label", str(phantom_file), "-o", str(out), "--model", str(model), "--quiet", "--no-spine-gate"]
    assert main(argv) == 128 + sig
    assert "spinelabel: terminated" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert signal.getsignal(sig) == before  # the handler is put back


def test_a_failed_input_names_the_outputs_an_earlier_run_left(tmp_path, model, capsys):
    bad = tmp_path / "blank.nii.gz"
    sitk.WriteImage(sitk.Image([40, 40, 40], sitk.sitkFloat32), str(bad))
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "blank_seg.nii.gz"
    earlier.write_bytes(b"an earlier run")
    (out / "blank_report.json").write_text("{}")  # an earlier run's outputs come with its report
    assert main(["label", str(bad), "-o", str(out), "--model", str(model), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"the outputs of an earlier run in {out} were left as they were: blank_seg.nii.gz" in err, err
    assert earlier.read_bytes() == b"an earlier run"


def test_a_file_of_another_program_appearing_during_a_run_is_no_earlier_runs_output(tmp_path, model, phantom_file,
                                                                                    monkeypatch, capsys):
    """A file of an output's name without the report beside it is no earlier run's output (check_replaceable); one
    that appears after the check made at the start fails the input, and the line said it was both."""
    from SpineLabelLib import writers

    write_all = writers.write_all

    def appears_first(result, image, out, name, input_path=None):
        (out / f"{name}_seg.nii.gz").write_bytes(b"someone else's mask")
        return write_all(result, image, out, name, input_path=input_path)

    monkeypatch.setattr(writers, "write_all", appears_first)
    out = tmp_path / "out"
    argv = ["label", str(phantom_file), "-o", str(out), "--model", str(model), "--quiet", "--no-spine-gate"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "it is no output of an earlier run" in err and "spine_seg.nii.gz" in err.split("left as they were:")[1], err
    assert "the outputs of an earlier run" not in err, err
    assert (out / "spine_seg.nii.gz").read_bytes() == b"someone else's mask"


@pytest.mark.parametrize("name", ["spine.nii.gz", "spine.nrrd"])
def test_a_phantom_that_the_disk_cannot_hold_fails_and_leaves_nothing(tmp_path, name):
    """A file-size limit stands in for a full disk: ITK's NIfTI writer said so on stderr only, and the command exited
    0 with a truncated image and an empty label map beside it."""
    import resource

    def full_disk_at_100_kb():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) rather than the process

    run = subprocess.run([sys.executable, "-m", "SpineLabelLib.cli", "phantom", str(tmp_path / name), "--fov", "lumbar",
                          "--spacing", "2", "2", "2.5"], capture_output=True, text=True, preexec_fn=full_disk_at_100_kb)
    assert run.returncode != 0 and f"cannot write {tmp_path / name}" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder(tmp_path, model, phantom_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["label", str(phantom_file), "-o", str(blocker / "out"), "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert str(blocker / "out") in err and "not writable" in err


def test_missing_model_is_a_clear_error(tmp_path, phantom_file, capsys):
    assert main(["label", str(phantom_file), "-o", str(tmp_path), "--model", str(tmp_path / "none.json")]) == 2
    assert "model card not found" in capsys.readouterr().err
    assert main(["label", str(phantom_file), "-o", str(tmp_path), "--model", "nosuch-model"]) == 2
    assert "nosuch-model: no model card of that name here and no model registered under it" in capsys.readouterr().err


def test_a_registry_that_cannot_be_searched_refuses_the_model_before_labelling(tmp_path, phantom_file, capsys,
                                                                                monkeypatch):
    """A folder of registered models without search permission made Path.is_file raise: exit 1 and a bare errno
    line, where a model refused before labelling exits 2 with the path and the reason."""
    registry = tmp_path / "models"
    registry.mkdir()
    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(registry))
    is_file = Path.is_file

    def searched(self, *args, **kwargs):
        if self.parent == registry:
            raise PermissionError(13, "Permission denied", str(self))
        return is_file(self, *args, **kwargs)

    monkeypatch.setattr(Path, "is_file", searched)
    assert main(["label", str(phantom_file), "-o", str(tmp_path / "out"), "--model", "mine"]) == 2
    assert f"{registry / 'mine.json'}: cannot be read (Permission denied)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_does_not_import_torch():
    code = "import sys; from SpineLabelLib.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_an_unexpected_error_fails_only_its_input(tmp_path, model, phantom_file, monkeypatch, capsys):
    from SpineLabelLib import pipeline

    first = tmp_path / "first.nii.gz"
    first.write_bytes(phantom_file.read_bytes())
    calls, label_spine = [], pipeline.label_spine

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError()
        return label_spine(*args, **kwargs)

    monkeypatch.setattr(pipeline, "label_spine", out_of_memory_once)
    out = tmp_path / "out"
    argv = ["label", str(first), str(phantom_file), "-o", str(out), "--model", str(model), "--quiet",
            "--no-spine-gate", "--modality", "mr"]
    assert main(argv) == 1
    assert f"spinelabel: failed: {first}: MemoryError" in capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"spine" + s for s in OUTPUT_SUFFIXES}


def test_two_inputs_of_one_name_are_refused_before_labelling(tmp_path, model, phantom_file, capsys):
    """Also names that differ only in case: on Windows and macOS their outputs are the same files."""
    for name in (phantom_file.name, phantom_file.name.upper().replace(".NII.GZ", ".nii.gz")):
        other = tmp_path / "other" / name
        other.parent.mkdir(exist_ok=True)
        other.write_bytes(phantom_file.read_bytes())
        out = tmp_path / "out"
        assert main(["label", str(phantom_file), str(other), "-o", str(out), "--model", str(model)]) == 2
        assert "would both write" in capsys.readouterr().err and not out.exists()
        other.unlink()


def test_an_input_given_twice_is_labelled_once(tmp_path, model, phantom_file, capsys):
    """It was labelled twice; spelt another way (through ..) it was refused as two inputs of one name."""
    detour = phantom_file.parent / ".." / phantom_file.parent.name / phantom_file.name
    out = tmp_path / "out"
    argv = ["label", str(phantom_file), str(phantom_file), str(detour), "-o", str(out), "--model", str(model),
            "--no-spine-gate", "--modality", "mr"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert f"{phantom_file} given more than once: labelled once" in printed.err
    assert f"{detour} is {phantom_file}, given before: labelled once" in printed.err
    assert len(re.findall(r": \d+ vertebrae \(", printed.out)) == 1  # one summary line


def test_a_path_the_console_cannot_print_does_not_end_the_run(tmp_path, model, phantom_file, monkeypatch):
    """Redirected output on Windows is cp1252: an input named in another script raised UnicodeEncodeError at its
    summary line and the inputs after it were never labelled."""
    import io

    odd = tmp_path / "Łódź.nii.gz"
    try:
        os.fsencode(odd)
    except UnicodeEncodeError:  # Python in a C locale without its UTF-8 mode, or in a Latin-1 locale
        pytest.skip(f"this file system encoding ({sys.getfilesystemencoding()}) cannot name {odd.name}")
    odd.write_bytes(phantom_file.read_bytes())
    console = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", console)
    out = tmp_path / "out"
    argv = ["label", str(odd), str(phantom_file), "-o", str(out), "--model", str(model), "--no-spine-gate"]
    assert main(argv) == 0
    assert len(list(out.iterdir())) == 12
    console.flush()
    assert "\\u0141ód\\u017a.nii.gz: " in console.buffer.getvalue().decode("cp1252")  # what cp1252 lacks, escaped


def test_an_output_folder_that_is_a_dangling_link_is_refused_as_such(tmp_path, model, phantom_file, capsys):
    """It was said to be not writable because its 'File exists'."""
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "gone")
    assert main(["label", str(phantom_file), "-o", str(out), "--model", str(model), "--quiet"]) == 2
    assert f"{out}: output folder not writable (a link to {tmp_path / 'gone'}, which does not exist)" in (
        capsys.readouterr().err)


def test_an_output_that_would_replace_an_input_is_refused(tmp_path, model, phantom_file, capsys):
    out = tmp_path / "out"
    out.mkdir()
    image, mask = out / "case.nii.gz", out / "case_seg.nii.gz"  # the user's own mask, named as an output would be
    image.write_bytes(phantom_file.read_bytes())
    mask.write_bytes(b"the user's mask")
    assert main(["label", str(image), str(mask), "-o", str(out), "--model", str(model), "--quiet"]) == 2
    assert f"{mask} would replace the input {mask}" in capsys.readouterr().err
    assert mask.read_bytes() == b"the user's mask" and sorted(p.name for p in out.iterdir()) == [image.name, mask.name]
    # the scan alone: its mask is no input, but no earlier run's output either (no report beside it): kept
    assert main(["label", str(image), "-o", str(out), "--model", str(model), "--quiet"]) == 2
    assert f"{mask} would be replaced, and it is no output of an earlier run" in capsys.readouterr().err
    assert mask.read_bytes() == b"the user's mask"
    mask.unlink()  # an earlier run's outputs, report and all, are replaced
    assert main(["label", str(image), "-o", str(out), "--model", str(model), "--quiet", "--no-spine-gate"]) == 0
    assert main(["label", str(image), "-o", str(out), "--model", str(model), "--quiet", "--no-spine-gate"]) == 0


def test_labelling_options_without_label_are_refused(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), str(tmp_path), "--model", "m.json", "--modality", "ct"]) == 2
    assert "--model, --modality only apply with --label" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), str(tmp_path), "--device", "cpu"]) == 2
    assert "--device only applies with --label" in capsys.readouterr().err


def test_without_a_home_directory_the_registered_models_are_skipped(tmp_path, monkeypatch, capsys, caplog):
    """No HOME and a user id the system does not know (a container's bare user id): Path.home() raises, and
    `spinelabel models`, a model named on the command line and a training's check of its --out stopped with "Could
    not determine home directory"."""
    from SpineLabelLib.models import card_file, registration_path

    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("SPINELABEL_MODELS_DIR", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(no_home))
    assert main(["models"]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == [DEFAULT_MODEL_NAME]
    assert "skipping the registered models: no home directory to find them in" in caplog.text
    assert card_file("mine") == Path("mine")  # a name no model has: read_card says so
    with pytest.raises(ModelError, match="no folder for registered models: there is no home directory; set "):
        registration_path("mine")


def test_models_lists_the_shipped_and_the_registered_models(tmp_path, monkeypatch, capsys, model):
    from SpineLabelLib.models import card_file, register_model

    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(tmp_path))
    registered = register_model(model, name="mine")
    assert main(["models"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [(name, path) for name, _, path in lines] == [(DEFAULT_MODEL_NAME, str(default_model_path())),
                                                        ("mine", str(registered))]
    # a card copied into the registry by hand, its name not its file's: listed by the name --model takes
    (tmp_path / "copied.json").write_text(registered.read_text())
    assert main(["models"]) == 0
    listed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [DEFAULT_MODEL_NAME, "copied", "mine"]
    assert card_file("copied") == tmp_path / "copied.json"  # what --model copied loads


def test_train_register_refuses_a_registered_name_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(tmp_path))
    (tmp_path / "mine.json").write_text("{}")
    argv = ["train", "--data", "phantom", "--out", str(tmp_path / "new" / "mine.json"), "--name", "mine", "--register"]
    assert main(argv) == 2
    assert "a model named 'mine' is registered already" in capsys.readouterr().err
    assert main([*argv[:-3], "--name", "sub/mine", "--register"]) == 2
    assert "'sub/mine': a model name is a file name" in capsys.readouterr().err
    assert main([*argv[:-3], "--name", "spinelabel-default", "--register"]) == 2
    assert capsys.readouterr().err == ("spinelabel: error: 'spinelabel-default' is the name of the model shipped with "
                                       "SpineLabel; choose another --name\n")
    assert not (tmp_path / "new").exists()
    (tmp_path / "spinelabel-trained.json").write_text("{}")  # without --name: a model trained from scratch
    assert main([*argv[:-3], "--register"]) == 2
    assert "a model named 'spinelabel-trained' is registered already" in capsys.readouterr().err


def test_evaluate_labels_an_exported_case_as_its_dataset_records(tmp_path, phantom_file, monkeypatch):
    gt = tmp_path / "Dataset001"
    for folder, name in (("imagesTr", "spine_0001_0000.nii.gz"), ("labelsTr", "spine_0001.nii.gz")):
        (gt / folder).mkdir(parents=True)
        (gt / folder / name).write_bytes(phantom_file.read_bytes())
    (gt / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}))
    asked = []

    def label_spine(image, **kwargs):
        asked.append(kwargs["modality"])
        raise RuntimeError("not labelled here")

    monkeypatch.setattr("SpineLabelLib.pipeline.label_spine", label_spine)
    main(["evaluate", str(tmp_path / "pred"), str(gt), "--label", "--quiet"])
    assert asked == ["ct"]  # the export's record, not what auto would detect
    main(["evaluate", str(tmp_path / "pred"), str(gt), "--label", "--modality", "mr", "--quiet"])
    assert asked == ["ct", "mr"]  # the user's choice first


def test_an_input_whose_outputs_the_file_system_cannot_name_fails_alone(tmp_path, model, phantom_file, capsys):
    long = tmp_path / ("n" * 248 + ".nii.gz")  # a legal name; NAME_snapshot.png would be 261 characters
    long.write_bytes(phantom_file.read_bytes())
    out = tmp_path / "out"
    argv = ["label", str(long), str(phantom_file), "-o", str(out), "--model", str(model), "--quiet", "--no-spine-gate"]
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith(f"spinelabel: failed: {long}: its output {'n' * 248}_snapshot.png "
                                              "would be a file name of more than 255 bytes")  # before its labelling
    assert {p.name for p in out.iterdir()} == {case_name(phantom_file) + s for s in OUTPUT_SUFFIXES}


def test_evaluate_label_scores_a_case_it_failed_to_label_as_not_predicted(tmp_path, model, phantom_file,
                                                                         monkeypatch):
    from SpineLabelLib import pipeline

    gt, pred = tmp_path / "Dataset001", tmp_path / "pred"
    labels = (phantom_file.parent / "spine_seg-vert_msk.nii.gz").read_bytes()
    pred.mkdir()
    for case in ("spine_0001", "spine_0002"):
        for folder, name, data in (("imagesTr", f"{case}_0000.nii.gz", phantom_file.read_bytes()),
                                   ("labelsTr", f"{case}.nii.gz", labels)):
            (gt / folder).mkdir(parents=True, exist_ok=True)
            (gt / folder / name).write_bytes(data)
        (pred / f"{case}_0000_seg.nii.gz").write_bytes(labels)  # an earlier run's: perfect
        (pred / f"{case}_0000_report.json").write_text("{}")
    original = pipeline.label_spine

    calls = []

    def label_spine(image, **kwargs):
        calls.append(image)
        if len(calls) == 1:  # the cases are labelled in order: spine_0001
            raise RuntimeError("not labelled this time")
        return original(image, **kwargs)

    monkeypatch.setattr(pipeline, "label_spine", label_spine)
    summary = tmp_path / "summary.json"
    argv = ["evaluate", str(pred), str(gt), "--label", "--model", str(model), "--no-spine-gate", "--json", str(summary),
            "--quiet"]
    assert main(argv) == 1
    missing = [c["prediction_missing"] for c in json.loads(summary.read_text())["cases"]]  # spine_0001, spine_0002
    assert missing == [True, False]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is POSIX")
def test_a_run_under_nohup_outlives_the_terminal(tmp_path, model, phantom_file, monkeypatch):
    from SpineLabelLib import writers

    write_all = writers.write_all

    def hang_up_then_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGHUP)  # the terminal closes while the run writes
        return write_all(*args, **kwargs)

    monkeypatch.setattr(writers, "write_all", hang_up_then_write)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup starts it
    try:
        out = tmp_path / "out"
        argv = ["label", str(phantom_file), "-o", str(out), "--model", str(model), "--quiet", "--no-spine-gate"]
        assert main(argv) == 0 and len(list(out.iterdir())) == len(OUTPUT_SUFFIXES)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_evaluate_refuses_a_report_path_that_would_overwrite_a_scored_file(tmp_path, phantom_file, capsys):
    gt = tmp_path / "gt"
    gt.mkdir()
    mask = gt / "spine_seg-vert_msk.nii.gz"
    mask.write_bytes((phantom_file.parent / "spine_seg-vert_msk.nii.gz").read_bytes())
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "spine_seg.nii.gz").write_bytes(mask.read_bytes())
    image, markups = gt / "spine_ct.nii.gz", pred / "spine.mrk.json"  # not scored, but the case's
    image.write_bytes(phantom_file.read_bytes())
    markups.write_text("{}")
    for option, path, reason in (("--markdown", mask, "a file being scored"),
                                 ("--json", pred / "spine_seg.nii.gz", "a file being scored"),
                                 ("--markdown", image, "is an image"), ("--json", markups, "a file being scored")):
        assert main(["evaluate", str(pred), str(gt), option, str(path), "--quiet"]) == 1
        assert reason in capsys.readouterr().err
    assert image.read_bytes() == phantom_file.read_bytes() and markups.read_text() == "{}"
    assert main(["evaluate", str(pred), str(gt), "--json", str(tmp_path / "r"), "--markdown", str(tmp_path / "r"),
                 "--quiet"]) == 1
    assert "both the JSON and the Markdown report" in capsys.readouterr().err
    assert mask.read_bytes() == (pred / "spine_seg.nii.gz").read_bytes() and not (tmp_path / "r").exists()


def test_evaluate_label_checks_the_report_paths_before_labelling(tmp_path, model, phantom_file, capsys):
    gt = tmp_path / "gt"
    (gt / "imagesTr").mkdir(parents=True)
    (gt / "labelsTr").mkdir()
    image = gt / "imagesTr" / "spine_0000.nii.gz"
    image.write_bytes(phantom_file.read_bytes())
    (gt / "labelsTr" / "spine.nii.gz").write_bytes((phantom_file.parent / "spine_seg-vert_msk.nii.gz").read_bytes())
    (tmp_path / "folder").mkdir()
    for option, path, reason in (("--markdown", image, "a file being scored"), ("--json", tmp_path / "folder",
                                                                                "is a folder"),
                                 ("--json", tmp_path / "pred" / "x_ctd.json", "x_ctd.json")):  # a later run's input
        argv = ["evaluate", str(tmp_path / "pred"), str(gt), "--label", "--model", str(model), option, str(path),
                "--quiet"]
        assert main(argv) == 1
        assert reason in capsys.readouterr().err
    assert image.read_bytes() == phantom_file.read_bytes() and not (tmp_path / "pred").exists()


def test_an_empty_path_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["label", "", "-o", "out"])
    assert "an empty path names no file or folder" in capsys.readouterr().err


def test_failed_evaluate_label_and_train_leave_no_folder_they_made(tmp_path, phantom_file):
    gt = tmp_path / "gt"
    (gt / "imagesTr").mkdir(parents=True)
    (gt / "labelsTr").mkdir()
    (gt / "imagesTr" / "spine_0000.nii.gz").write_bytes(phantom_file.read_bytes())
    (gt / "labelsTr" / "spine.nii.gz").write_bytes((phantom_file.parent / "spine_seg-vert_msk.nii.gz").read_bytes())
    missing = str(tmp_path / "none.json")
    assert main(["evaluate", str(tmp_path / "new" / "pred"), str(gt), "--label", "--model", missing, "--quiet"]) == 2
    assert main(["train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "new" / "m.json"),
                 "--epochs", "1", "--iterations", "1", "--quiet"]) != 0
    assert main(["train", "--data", "phantom", "--out", str(tmp_path / "new" / "m.json"), "--spacing", "0",
                 "--quiet"]) != 0
    assert not (tmp_path / "new").exists()


def test_phantom_into_a_path_through_a_file_names_the_folder(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    argv = ["phantom", str(tmp_path / "afile" / "x.nii.gz"), "--fov", "lumbar", "--spacing", "2", "2", "2.5", "--quiet"]
    assert main(argv) == 1
    assert f"{tmp_path / 'afile'}: cannot make this folder: {tmp_path / 'afile'} is a file" in capsys.readouterr().err


def test_a_phantom_that_cannot_be_written_leaves_no_folder_it_made(tmp_path, capsys):
    # a full disk: a file-size limit fails the write as one does (Python ignores SIGXFSZ: EFBIG)
    resource = pytest.importorskip("resource")  # POSIX

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        assert main(["phantom", str(tmp_path / "new" / "sub" / "x.nii.gz"), "--fov", "lumbar", "--quiet"]) == 1
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "x.nii.gz" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_name_too_long_is_refused_before_labelling(tmp_path, capsys):
    (tmp_path / "x.nii.gz").write_bytes(b"")
    out = tmp_path / ("b" * 300)
    assert main(["label", str(tmp_path / "x.nii.gz"), "-o", str(out), "--quiet"]) == 2
    assert f"{out}: output folder not writable (File name too long)" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", ["_report.json", "_seg.nii.gz"])
def test_a_folder_of_an_outputs_name_is_refused_before_labelling(tmp_path, capsys, suffix):
    (tmp_path / "x.nii.gz").write_bytes(b"")  # never read: the refusal comes first
    (tmp_path / "out" / f"x{suffix}").mkdir(parents=True)
    assert main(["label", str(tmp_path / "x.nii.gz"), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"x{suffix} is a folder" in err and "earlier run" not in err


def test_an_interrupted_training_points_to_its_own_checkpoint_only(tmp_path, monkeypatch, capsys):
    """The hint to resume names the checkpoint of this run's --out as training names it (model.v2 ->
    model.v2.ckpt), and only one this run wrote or resumed from: one left by another run may hold other settings."""
    from SpineLabelTrainingLib import training

    out = tmp_path / "model.v2"
    ckpt = tmp_path / "model.v2.ckpt"

    def interrupted(cfg, progress=None, cancel=None, write=True):
        if write:
            ckpt.write_bytes(b"epoch 1")
        raise KeyboardInterrupt

    argv = ["train", "--data", "phantom", "--out", str(out), "--quiet"]
    monkeypatch.setattr(training, "train", interrupted)
    assert main(argv) == 130
    hint = f"spinelabel: interrupted (the same command with --resume continues from {ckpt})"
    assert capsys.readouterr().err.strip() == hint
    os.utime(ckpt, (1e9, 1e9))  # left by an earlier run
    monkeypatch.setattr(training, "train", lambda cfg, progress=None, cancel=None: interrupted(cfg, write=False))
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == "spinelabel: interrupted"
    assert main([*argv, "--resume"]) == 130
    assert "--resume continues from" in capsys.readouterr().err


def test_a_training_stopped_by_a_full_disk_points_to_its_checkpoint(tmp_path, monkeypatch, capsys):
    """A write that fails after an epoch (the next checkpoint, the model on a full disk) keeps the last checkpoint,
    and the message says that --resume continues from it, as it does for a stopped run."""
    from SpineLabelTrainingLib import training

    out, ckpt = tmp_path / "m.json", tmp_path / "m.ckpt"

    def full_disk(cfg, progress=None, cancel=None):
        ckpt.write_bytes(b"epoch 1")
        raise OSError(28, f"cannot write {out.with_suffix('.pt')}: No space left on device")

    monkeypatch.setattr(training, "train", full_disk)
    assert main(["train", "--data", "phantom", "--out", str(out), "--quiet"]) == 1
    assert f"(the same command with --resume continues from {ckpt})" in capsys.readouterr().err


def test_a_training_source_is_read_with_its_weight_unless_a_folder_has_the_whole_name(tmp_path, monkeypatch):
    """``--data SOURCE[:WEIGHT]``: a folder named ``export_12:30`` was taken for ``export_12`` at weight 30."""
    from SpineLabelLib.cli import _data_source

    monkeypatch.chdir(tmp_path)
    assert _data_source("export_12:30") == ("export_12", 30.0)
    assert _data_source("synthetic:0.5") == ("synthetic", 0.5) and _data_source("C:data") == ("C:data", 1.0)
    (tmp_path / "export_12:30").mkdir()
    assert _data_source("export_12:30") == ("export_12:30", 1.0)
    assert _data_source("export_12:30:2") == ("export_12:30", 2.0)


def test_a_run_starting_while_another_renames_into_its_folder_is_not_refused(tmp_path, model, phantom_file, capsys,
                                                                             monkeypatch):
    """The check at a run's start, before labelling, saw the snapshot another run had renamed and not yet its report:
    'NAME_snapshot.png would be replaced, and it is no output of an earlier run'."""
    import threading

    from SpineLabelLib import io, pipeline

    out, name, renaming = tmp_path / "out", case_name(phantom_file), threading.Event()
    out.mkdir()

    def other_run():  # its snapshot renamed, its report not yet
        with io.folder_lock(out):
            (out / f"{name}_snapshot.png").write_bytes(b"")
            renaming.set()
            threading.Event().wait(0.5)
            (out / f"{name}_report.json").write_text("{}")

    def label_spine(image, **kwargs):
        raise RuntimeError("not labelled here")

    monkeypatch.setattr(pipeline, "label_spine", label_spine)
    other = threading.Thread(target=other_run)
    other.start()
    assert renaming.wait(10)
    main(["label", str(phantom_file), "-o", str(out), "--model", str(model), "--quiet"])
    other.join()
    err = capsys.readouterr().err
    assert "would be replaced" not in err and "not labelled here" in err


def test_an_output_folder_that_is_a_file_or_holds_another_program_s_outputs_is_refused_with_status_2(
        tmp_path, model, phantom_file, capsys):
    """Both are refusals before any labelling (exit status 2, as the help says), each with its own line."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["label", str(phantom_file), "-o", str(afile), "--model", str(model), "--quiet"]) == 2
    assert capsys.readouterr().err == f"spinelabel: error: {afile}: is a file, not an output folder\n"
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / f"{case_name(phantom_file)}_seg.nii.gz"  # a reference mask, say, with no report beside it
    theirs.write_bytes(b"theirs")
    assert main(["label", str(phantom_file), "-o", str(out), "--model", str(model), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spinelabel: error: {theirs} would be replaced") and err.endswith(
        "; choose another output folder\n")
    assert theirs.read_bytes() == b"theirs" and sorted(out.iterdir()) == [theirs]


def test_two_inputs_that_fail_end_with_the_count_of_those_labelled(tmp_path, model, phantom_file, capsys,
                                                                            monkeypatch):
    from SpineLabelLib import pipeline

    def label_spine(image, **kwargs):
        raise RuntimeError("not labelled here")

    monkeypatch.setattr(pipeline, "label_spine", label_spine)
    other = tmp_path / "other.nii.gz"
    other.write_bytes(phantom_file.read_bytes())
    assert main(["label", str(phantom_file), str(other), "-o", str(tmp_path / "out"), "--model", str(model),
                 "--quiet"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"spinelabel: 0 of 2 inputs labelled; failed: {phantom_file}, {other}"


def test_phantom_names_the_files_it_wrote_unless_quiet(tmp_path, capsys):
    argv = ["phantom", str(tmp_path / "p.nii.gz"), "--fov", "lumbar", "--size", "24", "24", "40"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "p.nii.gz"),
                                                    str(tmp_path / "p_seg-vert_msk.nii.gz")]
    assert main([*argv, "--quiet"]) == 0 and capsys.readouterr().out == ""


def test_train_passes_its_settings_and_names_a_fine_tune_by_default(tmp_path, monkeypatch, capsys):
    """--quiet wins over --progress-bars; without --name a fine-tune is spinelabel-finetuned, a new model
    spinelabel-trained; --register refuses either name when it is taken, before training."""
    from SpineLabelTrainingLib import training

    seen = []

    def train(cfg, progress=None, cancel=None):
        seen.append(cfg)
        return tmp_path / "card.json"

    monkeypatch.setattr(training, "train", train)
    argv = ["train", "--data", "phantom", "--out", str(tmp_path / "m.json")]
    for extra, bars in (([], None), (["--progress-bars"], True), (["--quiet"], False),
                        (["--quiet", "--progress-bars"], False)):
        assert main([*argv, *extra]) == 0
        assert seen[-1].progress_bars is bars, extra
    assert seen[0].name == "spinelabel-trained"
    assert main([*argv, "--base-model", "spinelabel-default"]) == 0 and seen[-1].name == "spinelabel-finetuned"
    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(tmp_path / "registry"))
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "spinelabel-finetuned.json").write_text("{}")
    capsys.readouterr()
    count = len(seen)
    assert main([*argv, "--base-model", "spinelabel-default", "--register"]) == 2 and len(seen) == count
    assert "a model named 'spinelabel-finetuned' is registered already" in capsys.readouterr().err


def test_evaluate_label_that_labels_no_case_fails(tmp_path, model, phantom_file, monkeypatch, capsys):
    from SpineLabelLib import pipeline

    def label_spine(image, **kwargs):
        raise RuntimeError("not labelled here")

    monkeypatch.setattr(pipeline, "label_spine", label_spine)
    argv = ["evaluate", str(tmp_path / "pred"), str(phantom_file.parent), "--label", "--model", str(model), "--quiet"]
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"spinelabel: error: no reference case of "
                                                        f"{phantom_file.parent} could be labelled")


def test_the_signal_handlers_are_put_back_after_a_run(capsys):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))}
    assert main(["models"]) == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_each_labelling_option_without_label_is_refused(tmp_path, capsys):
    for option in (["--check-orientation"], ["--no-spine-gate"], ["--modality", "mr"], ["--model", "m.json"],
                   ["--device", "cuda"]):
        assert main(["evaluate", str(tmp_path), str(tmp_path), *option]) == 2
        assert f"{option[0]} only applies with --label" in capsys.readouterr().err


def test_an_error_is_one_line_unless_debug_which_shows_its_traceback(tmp_path, capsys):
    argv = ["evaluate", str(tmp_path / "pred"), str(tmp_path), "--label"]  # no reference case here
    assert main([*argv, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"spinelabel: error: {tmp_path}: no reference") and err.count("\n") == 1
    with pytest.raises(Exception, match="no reference"):
        main([*argv, "--debug"])


def test_verbose_and_debug_set_the_log_level(tmp_path, monkeypatch, capsys):
    import logging

    levels = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: levels.append(kwargs["level"]))
    argv = ["evaluate", str(tmp_path), str(tmp_path), "--device", "cpu"]  # refused at once
    for flags in ([], ["--verbose"], ["--debug"], ["--verbose", "--debug"]):
        assert main([*argv, *flags]) == 2
    assert levels == [logging.WARNING, logging.INFO, logging.DEBUG, logging.DEBUG]

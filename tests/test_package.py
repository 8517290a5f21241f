"""Model packages (`medseg export`) and the ONNX engine: what goes in, what is refused, and that a package or an
ONNX network predicts what the run predicts."""
import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image as PILImage

from conftest import shared_dataset
from medseg.checkpoint import load_models
from medseg.cli import main
from medseg.data import load_case
from medseg.datasets import find_cases
from medseg.errors import MedsegError
from medseg.infer import ensemble_probabilities, final_labels
from medseg.io import read_image
from medseg.onnx_engine import use_onnxruntime
from medseg.package import export_package, open_package


@pytest.fixture(scope="module")
def evaluated_2d(trained_2d, tmp_path_factory):
    run = tmp_path_factory.mktemp("pkg") / "run"
    shutil.copytree(trained_2d, run)
    assert main(["evaluate", str(run), "--quiet", "--figures", "0"]) == 0
    return run


@pytest.fixture(scope="module")
def package_2d(evaluated_2d, tmp_path_factory):
    return export_package(evaluated_2d, tmp_path_factory.mktemp("pkg") / "model.zip", onnx=True)


def test_a_package_holds_weights_settings_metrics_card_and_checksums(package_2d, evaluated_2d):
    with zipfile.ZipFile(package_2d) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("package.json"))
        card = archive.read("model_card.md").decode()
        config = json.loads(archive.read("members/model/config.json"))
    assert {"members/model/best.pt", "members/model/network.onnx", "members/model/postprocessing.json",
            "model_card.md", "package.json"} <= names
    assert manifest["format"] == "medseg-package" and manifest["format_version"] == 1
    assert set(manifest["files"]) == names - {"package.json"}
    assert manifest["class_names"] == ["background", "ellipse", "ring"]
    assert all(c.startswith("#") and len(c) == 7 for c in manifest["colours"].values())
    summary = json.loads((evaluated_2d / "evaluation" / "summary.json").read_text())
    evaluation = manifest["evaluation"]
    assert evaluation["cases"] == summary["cases"] and "used for no choice" in evaluation["which"]
    assert evaluation["per_class"]["ellipse"]["dice"]["ci95"] == summary["per_class"]["ellipse"]["dice"]["ci95"]
    for section in ("## Intended use", "## Training data", "## Test metrics", "## Subgroups",
                    "## Known failure cases"):
        assert section in card
    assert "/" not in config["data"] and "/" not in config["out"]  # nothing points at the exporter's disk
    assert str(evaluated_2d.parent) not in json.dumps(manifest) + card


def test_predicting_with_the_package_gives_the_runs_masks(package_2d, evaluated_2d, phantoms_2d, tmp_path):
    images = phantoms_2d / "imagesTr"
    for source, out in ((evaluated_2d, "from_run"), (package_2d, "from_package")):
        assert main(["predict", str(source), str(images), "--out", str(tmp_path / out), "--quiet"]) == 0
    for mask in (tmp_path / "from_run").iterdir():
        np.testing.assert_array_equal(np.asarray(PILImage.open(mask)),
                                      np.asarray(PILImage.open(tmp_path / "from_package" / mask.name)))


def test_a_package_exported_as_a_folder_works_like_the_zip(evaluated_2d, tmp_path):
    folder = export_package(evaluated_2d, tmp_path / "model_folder")
    assert (folder / "package.json").is_file() and len(load_models(folder)) == 1
    with pytest.raises(MedsegError, match="already exists"):
        export_package(evaluated_2d, folder)
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter.txt").write_text("mine")
    with pytest.raises(MedsegError, match="not a medseg package"):
        export_package(evaluated_2d, tmp_path / "thesis", overwrite=True)
    assert (tmp_path / "thesis" / "chapter.txt").read_text() == "mine"


def test_a_changed_package_is_refused(package_2d, tmp_path, capsys):
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(package_2d) as source, zipfile.ZipFile(tampered, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "members/model/postprocessing.json":
                data = data.replace(b'"classes": [', b'"classes": [1, ')
            target.writestr(item, data)
    with pytest.raises(MedsegError, match="postprocessing.json does not match its checksum"):
        open_package(tampered)
    assert main(["predict", str(tampered), str(tmp_path), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "does not match its checksum" in capsys.readouterr().err


def test_export_overwrite_never_replaces_a_node_project(evaluated_2d, tmp_path):
    """A folder with a package.json is not a medseg package unless that file says so."""
    project = tmp_path / "webapp"
    project.mkdir()
    (project / "package.json").write_text('{"name": "webapp", "version": "1.0.0"}')
    (project / "index.js").write_text("console.log('mine')")
    with pytest.raises(MedsegError, match="not a medseg package"):
        export_package(evaluated_2d, project, overwrite=True)
    assert (project / "index.js").read_text() == "console.log('mine')"


def test_files_the_manifest_does_not_list_or_paths_outside_it_are_refused(evaluated_2d, tmp_path):
    folder = export_package(evaluated_2d, tmp_path / "pkg")
    assert len(load_models(folder)) == 1
    (folder / "members" / "model" / "network.onnx").write_bytes(b"not listed")  # would be run by onnxruntime
    with pytest.raises(MedsegError, match="1 file\\(s\\) its manifest does not list \\(members/model/network.onnx"):
        open_package(folder)
    (folder / "members" / "model" / "network.onnx").unlink()
    manifest = json.loads((folder / "package.json").read_text())
    outside = tmp_path / "elsewhere"
    shutil.copytree(folder / "members" / "model", outside)
    manifest["members"] = ["../elsewhere"]  # a member outside the package
    (folder / "package.json").write_text(json.dumps(manifest))
    with pytest.raises(MedsegError, match="names '../elsewhere', outside the package"):
        open_package(folder)


def test_a_stray_onnx_file_in_a_run_folder_is_never_run(trained_2d, tmp_path):
    """Only a package's network.onnx, vouched for by its manifest, replaces the checkpoint's network."""
    run = tmp_path / "run"
    shutil.copytree(trained_2d, run)
    (run / "network.onnx").write_bytes(b"anything at all")
    models = use_onnxruntime(load_models(run, device="cpu"))
    assert str(models[0].model.path) != str(run / "network.onnx")


def test_a_package_of_another_format_version_is_refused(evaluated_2d, tmp_path):
    folder = export_package(evaluated_2d, tmp_path / "future")
    manifest = json.loads((folder / "package.json").read_text())
    manifest.update(format_version=2, medseg_version="9.0.0")
    (folder / "package.json").write_text(json.dumps(manifest))
    with pytest.raises(MedsegError, match=r"package format version 2 \(written by medseg 9.0.0\); this medseg reads "
                                          r"version 1"):
        load_models(folder)


def test_a_run_never_evaluated_says_so_in_its_card(trained_2d, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_2d, run, ignore=shutil.ignore_patterns("evaluation"))
    folder = export_package(run, tmp_path / "pkg")
    assert json.loads((folder / "package.json").read_text())["evaluation"] is None
    assert "Not evaluated on held-out cases" in (folder / "model_card.md").read_text()


def parity(models, image_array, spacing=None, affine=None):
    """Probabilities and masks from PyTorch and from onnxruntime for one normalised image."""
    torch_probs = ensemble_probabilities(models, image_array, spacing, affine)
    torch_labels = final_labels(models, torch_probs)
    onnx_models = use_onnxruntime(load_models(models[0].run, device="cpu"))
    onnx_probs = ensemble_probabilities(onnx_models, image_array, spacing, affine)
    return torch_probs, onnx_probs, torch_labels, final_labels(onnx_models, onnx_probs)


def test_onnx_parity_on_a_real_2d_image(trained_2d):
    """An ISBI section (512x512, not the 32x32 the network trained on), through PyTorch and onnxruntime."""
    models = load_models(trained_2d, device="cpu")
    case = find_cases(shared_dataset("isbi2012_em")).cases[0]
    loaded = load_case(case, models[0].config, resample=False)
    a, b, labels_a, labels_b = parity(models, loaded.image.array)
    assert a.shape[1:] == (512, 512)
    assert float(np.abs(a - b).max()) < 1e-4
    np.testing.assert_array_equal(labels_a, labels_b)


def test_onnx_parity_on_a_real_volume(trained_3d):
    """A hippocampus MRI volume through the 3D network's sliding window, in both engines."""
    models = load_models(trained_3d, device="cpu")
    case = find_cases(shared_dataset("msd_hippocampus", "Task04_Hippocampus")).cases[0]
    image = read_image(case.images[0])
    from medseg.transforms import normalize

    array = normalize(image.array, models[0].config.normalization, models[0].config.intensity_stats)
    a, b, labels_a, labels_b = parity(models, array, image.spacing, image.affine)
    assert a.shape[1:] == image.spatial_shape
    assert float(np.abs(a - b).max()) < 1e-4
    np.testing.assert_array_equal(labels_a, labels_b)


def test_predict_engines_auto_onnxruntime_and_compiled_write_the_same_masks(package_2d, phantoms_2d, tmp_path):
    images = phantoms_2d / "imagesTr"
    for engine in ("torch", "onnxruntime", "compiled", "auto"):
        assert main(["predict", str(package_2d), str(images), "--out", str(tmp_path / engine), "--engine", engine,
                     "--quiet"]) == 0
    for mask in (tmp_path / "torch").iterdir():
        for engine in ("onnxruntime", "compiled", "auto"):
            np.testing.assert_array_equal(np.asarray(PILImage.open(mask)),
                                          np.asarray(PILImage.open(tmp_path / engine / mask.name)))


# `medseg ...` in a Python where `import torch` fails, as on a server without PyTorch installed
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from medseg.cli import main; sys.exit(main(sys.argv[1:]))"


def medseg_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], capture_output=True, text=True, timeout=600)


def test_a_2d_package_predicts_without_pytorch(package_2d, phantoms_2d, tmp_path):
    """The same masks from the package under onnxruntime with PyTorch unimportable as from PyTorch itself."""
    images = phantoms_2d / "imagesTr"
    assert main(["predict", str(package_2d), str(images), "--out", str(tmp_path / "torch"), "--quiet"]) == 0
    done = medseg_without_torch("predict", str(package_2d), str(images), "--out", str(tmp_path / "ort"),
                                "--engine", "onnxruntime", "--uncertainty", "--quiet")
    assert done.returncode == 0, done.stderr
    masks = sorted(p.name for p in (tmp_path / "torch").iterdir())
    assert masks and {m.replace(".png", "_uncertainty.png") for m in masks} <= {p.name for p in (tmp_path / "ort").iterdir()}
    for name in masks:
        np.testing.assert_array_equal(np.asarray(PILImage.open(tmp_path / "torch" / name)),
                                      np.asarray(PILImage.open(tmp_path / "ort" / name)))


def test_a_3d_package_predicts_without_pytorch(trained_3d, phantoms_3d, tmp_path):
    """A 3D network's sliding window with mirroring TTA under onnxruntime and NumPy alone (the default engine,
    auto, picks it where PyTorch is missing): identical masks and probabilities within 1e-3 (written as float16) of
    PyTorch's."""
    package = export_package(trained_3d, tmp_path / "model3d.zip", onnx=True)
    images = sorted((phantoms_3d / "imagesTr").iterdir())[:3]
    args = ["predict", str(package), *map(str, images), "--format", "npz", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "torch")]) == 0
    done = medseg_without_torch(*args, "--out", str(tmp_path / "ort"))  # --engine auto finds the ONNX networks
    assert done.returncode == 0, done.stderr
    results = sorted((tmp_path / "torch").glob("*.npz"))
    assert len(results) == 3
    for path in results:
        a, b = np.load(path), np.load(tmp_path / "ort" / path.name)
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert np.abs(a["probabilities"].astype(np.float32) - b["probabilities"].astype(np.float32)).max() < 1e-3


def test_without_pytorch_a_package_lacking_onnx_says_what_to_do(evaluated_2d, phantoms_2d, tmp_path):
    package = export_package(evaluated_2d, tmp_path / "plain.zip")
    done = medseg_without_torch("predict", str(package), str(phantoms_2d / "imagesTr"), "--out",
                                str(tmp_path / "out"), "--engine", "onnxruntime", "--quiet")
    assert done.returncode == 2
    assert "--onnx" in done.stderr and "PyTorch" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_evaluate_with_a_package_leaves_out_the_cases_it_trained_on(package_2d, evaluated_2d, phantoms_2d,
                                                                    tmp_path):
    """The package names no case, yet recognises its training and validation cases by their content."""
    with zipfile.ZipFile(package_2d) as archive:
        assert "phantom" not in archive.read("members/model/split.json").decode()
    assert main(["evaluate", str(package_2d), "--data", str(phantoms_2d), "--out", str(tmp_path / "eval"),
                 "--quiet", "--figures", "0"]) == 0
    split = json.loads((evaluated_2d / "split.json").read_text())
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["cases"] == len(split["test"])


def test_the_runtime_requirements_are_the_dependencies_without_torch_plus_onnxruntime():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    runtime = [line.strip() for line in (root / "requirements-runtime.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert sorted(runtime) == sorted([d for d in declared if not d.startswith("torch")] + ["onnxruntime>=1.18"])


def test_the_runtime_lock_pins_every_package_with_hashes_and_satisfies_the_requirements():
    """requirements-runtime.lock is what `pip install --require-hashes` accepts: every entry `name==version` with
    at least one sha256, and each requirement of requirements-runtime.txt met by its pinned version."""
    import re
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    entries = re.split(r"\n(?=[A-Za-z])", "\n".join(line for line in (root / "requirements-runtime.lock").read_text()
                                                   .splitlines() if line.strip() and not line.startswith("#")))
    pinned = {}
    for entry in entries:
        name, version = re.match(r"([A-Za-z0-9_.-]+)==([^ \\]+)", entry).groups()
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), name
        pinned[name.lower().replace("_", "-")] = version
    for line in (root / "requirements-runtime.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            wanted = Requirement(line)
            assert wanted.specifier.contains(pinned[wanted.name.lower()]), line


def test_signed_packages_only_where_a_key_is_trusted(evaluated_2d, phantoms_2d, tmp_path, monkeypatch, capsys):
    """`export --sign KEY`, then `--trust KEY.pub`: the signed package predicts; an unsigned one, one signed by
    another key, one whose manifest changed after signing, and a bare run folder are refused in one line."""
    from medseg.signing import TRUST_ENV

    monkeypatch.setenv(TRUST_ENV, "")  # whatever the CLI sets below is undone after the test
    assert main(["keygen", str(tmp_path / "site.key")]) == 0
    assert (tmp_path / "site.key").stat().st_mode & 0o777 == 0o600
    assert main(["keygen", str(tmp_path / "other.key")]) == 0
    assert main(["keygen", str(tmp_path / "site.key")]) == 2  # a key is never overwritten
    signed = tmp_path / "signed.zip"
    assert main(["export", str(evaluated_2d), "--out", str(signed), "--sign", str(tmp_path / "site.key")]) == 0
    unsigned = export_package(evaluated_2d, tmp_path / "unsigned.zip")
    foreign = export_package(evaluated_2d, tmp_path / "foreign", sign_with=tmp_path / "other.key")
    altered = export_package(evaluated_2d, tmp_path / "altered", sign_with=tmp_path / "site.key")
    manifest = json.loads((altered / "package.json").read_text())
    manifest["class_names"][1] = "tumour"  # a checksum-consistent change: the hashes list stays as it was
    (altered / "package.json").write_text(json.dumps(manifest, indent=2))
    image = phantoms_2d / "imagesTr" / "phantom_000.png"
    trust = ["--trust", str(tmp_path / "site.key.pub"), "--quiet", "--device", "cpu"]
    capsys.readouterr()
    assert main(["predict", str(signed), str(image), "--out", str(tmp_path / "ok"), *trust]) == 0
    for package, why in ((unsigned, "not signed"), (foreign, "signature does not match"),
                         (altered, "signature does not match"), (evaluated_2d, "a run folder, not a signed package")):
        assert main(["predict", str(package), str(image), "--out", str(tmp_path / "no"), *trust]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], (package, err)
    assert not (tmp_path / "no").exists() or not list((tmp_path / "no").iterdir())
    monkeypatch.setenv(TRUST_ENV, "")
    assert len(load_models(altered)) == 1  # without a trusted key the checksums alone are checked, as before

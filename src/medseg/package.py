"""A model package: one file that carries a trained run (or ensemble) to wherever it is used.

`medseg export RUN --out model.zip` writes a zip (or, without the .zip suffix, a folder) holding, per member
network, its checkpoint (tensors and plain values, with its checksum) and the run's settings, which are the
pre-processing (normalisation, slicing axis, size, orientation, spacing) and post-processing (TTA, largest
component) as data; `package.json` with the class names and colours, the test-case metrics with their 95%
intervals where the run was evaluated, and a SHA-256 for every file; and `model_card.md`. With `--onnx`, each
member's network is also there as ONNX with its settings as data (`inference.json`), which `medseg predict
--engine onnxruntime` runs without PyTorch.

`medseg predict`, `evaluate --data`, `report` and the Python API take a package wherever they take a run. A package
of another format version, or whose files do not match their checksums, is refused with a message.

Nothing in a package points back at the machine it came from: paths in the settings are cut to their last
part, and the split is kept with each case id replaced by the case's content hash (so `evaluate PACKAGE --data`
still leaves out cases the networks trained on, without the package naming any case).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from medseg.errors import MedsegError
from medseg.io import extract_zip

FORMAT, VERSION = "medseg-package", 1
MANIFEST = "package.json"
CARD = "model_card.md"
MEMBER_FILES = ("config.json", "dataset.json", "postprocessing.json", "train_summary.json", "plan.json")
PATH_FIELDS = ("data", "out", "init_from", "tensorboard", "mlflow")


def is_package(path: str | Path) -> bool:
    """Whether PATH is a medseg package: its package.json says format medseg-package (a Node.js project's
    package.json does not, and `export --overwrite` never replaces one)."""
    path = Path(path)
    try:
        if path.is_dir():
            text = (path / MANIFEST).read_text() if (path / MANIFEST).is_file() else ""
        elif path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                text = archive.read(MANIFEST).decode() if MANIFEST in archive.namelist() else ""
        else:
            return False
        manifest = json.loads(text) if text else {}
    except (OSError, ValueError, zipfile.BadZipFile):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def export_package(run: str | Path, out: str | Path, onnx: bool = False, overwrite: bool = False,
                   sign_with: str | Path | None = None) -> Path:
    """Write the package of RUN (a run, an ensemble or a cross-validation folder) to OUT (.zip, or a folder),
    its manifest signed with the Ed25519 private key `sign_with` where given (`medseg.signing`)."""
    from medseg import __version__
    from medseg.checkpoint import load_models, read_checkpoint, save_checkpoint
    from medseg.io import write_text_atomic

    models = load_models(run, device="cpu")
    out = Path(out)
    if out.exists() and not overwrite:
        raise MedsegError(f"{out}: already exists; choose another --out, or pass --overwrite to replace it")
    if out.exists() and not is_package(out):
        raise MedsegError(f"{out}: not replaced: it is not a medseg package; choose another --out")
    staging = Path(tempfile.mkdtemp(prefix=".tmp-package-", dir=out.parent if out.parent.exists() else None))
    try:
        members = []
        for trained in models:
            name = trained.run.name if len(models) > 1 else "model"
            folder = staging / "members" / name
            folder.mkdir(parents=True)
            state = read_checkpoint(trained.run / "best.pt")
            state["config"] = _without_paths(state["config"])
            save_checkpoint(folder / "best.pt", state)
            for file in MEMBER_FILES:
                if (trained.run / file).exists():
                    text = (trained.run / file).read_text()
                    if file in ("config.json", "dataset.json"):
                        text = json.dumps(_without_paths(json.loads(text)), indent=2)
                    write_text_atomic(folder / file, text)
            if (trained.run / "split.json").exists():
                split = _anonymous_split(json.loads((trained.run / "split.json").read_text()))
                write_text_atomic(folder / "split.json", json.dumps(split, indent=2))
            if onnx:
                from medseg.onnx_engine import INFERENCE_SETTINGS, export_onnx, inference_settings

                export_onnx(trained, folder / "network.onnx")
                settings = inference_settings(trained)
                settings["config"] = _without_paths(settings["config"])
                write_text_atomic(folder / INFERENCE_SETTINGS, json.dumps(settings, indent=2))
            members.append(f"members/{name}")
        evaluation = _test_evaluation(Path(run))
        manifest = {"format": FORMAT, "format_version": VERSION, "medseg_version": __version__,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "members": members,
                    "class_names": models[0].class_names, "colours": class_colours(models[0].class_names),
                    "input": _input_description(models[0]), "onnx": onnx, "evaluation": evaluation}
        write_text_atomic(staging / CARD, model_card(models, manifest, Path(run)))
        manifest["files"] = {str(p.relative_to(staging)): _sha256(p) for p in sorted(staging.rglob("*"))
                             if p.is_file()}
        write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2))
        if sign_with:
            from medseg.signing import SIGNATURE, sign

            record = sign((staging / MANIFEST).read_bytes(), sign_with)
            write_text_atomic(staging / SIGNATURE, json.dumps(record, indent=2))
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def open_package(path: str | Path) -> Path:
    """Check a package (format version, every file's checksum) and return the folder its members are in (a zip
    is unpacked into a temporary folder removed at exit)."""
    path = Path(path)
    if path.is_dir():
        folder = path
    else:
        folder = Path(tempfile.mkdtemp(prefix="medseg-package-"))
        atexit.register(shutil.rmtree, folder, True)
        extract_zip(path, folder)
    from medseg.signing import SIGNATURE, trusted_key, verify

    key = trusted_key()
    if key is not None:  # before anything else is read: the signature vouches for the manifest, which vouches for all
        verify(folder, path, key)
    manifest = read_manifest(folder, path)
    for name in [*manifest["files"], *manifest["members"]]:
        if not _inside(folder, name):
            raise MedsegError(f"{path}: {MANIFEST} names {name!r}, outside the package; refused")
    for name, digest in manifest["files"].items():
        file = folder / name
        if not file.is_file() or _sha256(file) != digest:
            raise MedsegError(f"{path}: {name} {'is missing' if not file.is_file() else 'does not match its checksum'}"
                              "; the package was changed or damaged after export, export it again")
    listed = set(manifest["files"]) | {MANIFEST, SIGNATURE}
    unlisted = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                      if (p.is_file() or p.is_symlink()) and str(p.relative_to(folder)) not in listed)
    if unlisted:  # never loaded: a file the manifest does not vouch for could be anything
        raise MedsegError(f"{path}: holds {len(unlisted)} file(s) its manifest does not list ({', '.join(unlisted[:3])})"
                          "; the package was changed after export, export it again")
    return folder


def _inside(folder: Path, name: str) -> bool:
    """Whether a manifest's relative NAME stays inside FOLDER (no absolute path, no '..', no link out)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return False
    return (folder / name).resolve().is_relative_to(folder.resolve())


def read_manifest(folder: Path, shown: Path | None = None) -> dict:
    shown = shown or folder
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MedsegError(f"{shown}: {MANIFEST} cannot be read ({type(exc).__name__}); export the package again") from exc
    if manifest.get("format") != FORMAT:
        raise MedsegError(f"{shown}: not a medseg model package ({MANIFEST} says format {manifest.get('format')!r})")
    if manifest.get("format_version") != VERSION:
        raise MedsegError(f"{shown}: package format version {manifest.get('format_version')} (written by medseg "
                          f"{manifest.get('medseg_version', '?')}); this medseg reads version {VERSION}: export "
                          "the run again with this medseg, or use the medseg that wrote it")
    return manifest


def package_members(path: str | Path) -> list[Path]:
    """The member run folders of a package, after its checks."""
    folder = open_package(path)
    return [folder / member for member in read_manifest(folder)["members"]]


def _without_paths(settings: dict) -> dict:
    """Settings with machine paths cut to their last part (a package must not point at the exporter's disk)."""
    return {k: (Path(v).name if k in PATH_FIELDS and isinstance(v, str) and v else v) for k, v in settings.items()}


def _anonymous_split(split: dict) -> dict:
    """The split with each case id replaced by its content hash: `evaluate PACKAGE --data` still recognises (and
    leaves out) the cases the networks trained or were selected on, and the package names no case."""
    hashes = split.get("hashes") or {}
    roles = {role: sorted(hashes[c] for c in split.get(role, []) if c in hashes) for role in ("train", "val", "test")}
    # case ids stay at home, content hashes of images and masks too (the image hashes recognise trained cases)
    return {**{k: v for k, v in split.items() if k not in ("train", "val", "test", "hashes", "content_hashes")},
            **roles,
            "hashes": {h: h for ids in roles.values() for h in ids}}


def class_colours(class_names: list[str]) -> dict[str, str]:
    from medseg.figures import PALETTE

    return {name: "#%02x%02x%02x" % tuple(int(round(c * 255)) for c in PALETTE[k % len(PALETTE)])
            for k, name in enumerate(class_names) if k}


def _input_description(trained) -> dict:
    cfg = trained.config
    return {"channels": trained.in_channels, "dims": cfg.dims, "normalization": cfg.normalization,
            "color": cfg.color, "orientation": cfg.orientation, "target_spacing": cfg.target_spacing,
            "regions": cfg.regions}


def _test_evaluation(run: Path) -> dict | None:
    """The run's evaluation on its test cases (RUN/evaluation, as `medseg evaluate RUN` writes it), or None."""
    summary_path = run / "evaluation" / "summary.json"
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    if "used for no choice" not in summary.get("data", ""):
        return None  # selection cases or other data: not the figure a package should carry
    keep = ("dice", "iou", "hd95", "assd", "nsd")
    return {"cases": summary["cases"], "which": summary["data"].split(" of ")[0] + ", used for no choice",
            "mean_dice": summary["mean_dice"], "distance_unit": summary.get("distance_unit"),
            "per_class": {name: {m: {k: v for k, v in metrics[m].items() if k in ("mean", "std", "ci95", "n")}
                                 for m in keep if m in metrics}
                          for name, metrics in summary["per_class"].items()}}


def model_card(models: list, manifest: dict, run: Path) -> str:
    """Intended use, the training data in numbers, test metrics with intervals, subgroups and failure cases."""
    first = models[0]
    data = json.loads((first.run / "dataset.json").read_text()) if (first.run / "dataset.json").exists() else {}
    lines = [f"# Model card: {', '.join(manifest['class_names'][1:])} segmentation", "",
             f"Exported {manifest['created']} by medseg {manifest['medseg_version']}.", "",
             "## Intended use", "",
             f"Research use: segmenting {', '.join(manifest['class_names'][1:])} in images like the training data "
             f"({first.config.dims}D network{'s' if len(models) > 1 else ''} on "
             f"{first.in_channels}-channel input, {first.config.normalization} intensities). Not a medical device and "
             "not validated for clinical decisions; check every mask before relying on it. Images unlike the "
             "training data (another modality, scanner, resolution or anatomy) may fail without warning.", "",
             "## Training data", "",
             f"Dataset folder `{Path(data.get('data', '?')).name}` ({data.get('layout', '?')} layout): "
             f"{data.get('train_cases', '?')} training, {data.get('val_cases', '?')} validation (checkpoint and "
             f"post-processing chosen on these) and {data.get('test_cases', '?')} test cases (used for no choice).", "",
             "## How it was trained", ""]
    for trained in models:
        cfg = trained.config
        lines.append(f"- {trained.run.name}: {cfg.model} width {cfg.base_channels}, depth {cfg.depth}, "
                     f"{'axis ' + str(cfg.axis) + ' slices, ' if cfg.dims == 2 else ''}sample {cfg.sample_words}, "
                     f"{cfg.optimizer} lr {cfg.lr:g} {cfg.lr_schedule}, {cfg.steps or '?'} steps, seed {cfg.seed}")
    lines += ["", "## Test metrics", ""]
    evaluation = manifest["evaluation"]
    if evaluation is None:
        lines.append("Not evaluated on held-out cases: run `medseg evaluate RUN` before exporting to include them.")
    else:
        lines += [f"On {evaluation['cases']} {evaluation['which']} (mean and 95% bootstrap interval):", "",
                  "| class | Dice | HD95 |", "|---|---|---|"]
        for name, metrics in evaluation["per_class"].items():
            cells = []
            for m in ("dice", "hd95"):
                s = metrics.get(m)
                cells.append(f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if s and s.get("ci95")
                             else "not measured")
            lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += _groups_lines(run) + _failure_lines(run)
    return "\n".join(lines) + "\n"


def _groups_lines(run: Path) -> list[str]:
    path = run / "evaluation" / "groups.md"
    return ["", "## Subgroups", "", path.read_text().strip()] if path.exists() else \
        ["", "## Subgroups", "", "Not measured (`medseg evaluate RUN --groups CSV` measures them)."]


def _failure_lines(run: Path) -> list[str]:
    """The test cases with the lowest Dice: where the model is known to fail."""
    from medseg.evaluate import mean_dice_per_case, read_per_case

    if not (run / "evaluation" / "per_case.csv").exists():
        return []
    worst = sorted(mean_dice_per_case(read_per_case(run)).items(), key=lambda kv: kv[1])[:3]
    return ["", "## Known failure cases", "", "The test cases it segmented worst (mean Dice over classes):", ""] + \
        [f"- Dice {dice:.3f}" for _, dice in worst] + \
        ["", "Case names are left out of the package; they are in the run's evaluation/per_case.csv."]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _publish(staging: Path, out: Path) -> None:
    """Zip (deterministic member order) or move the staged package to OUT, through a temporary name."""
    from medseg.io import atomic_path

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".zip":
        with atomic_path(out) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                for file in sorted(p for p in staging.rglob("*") if p.is_file()):
                    archive.write(file, str(file.relative_to(staging)))
        return
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(staging, out)

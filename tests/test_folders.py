"""Nothing of the user's is deleted or overwritten: medseg replaces only folders it wrote, never an input."""
import hashlib

from medseg.cli import main
from medseg.folders import MARKER

TINY = ["--size", "32", "--base-channels", "4", "--depth", "2", "--epochs", "1", "--steps-per-epoch", "2", "--quiet"]


def fingerprint(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def users_folder(tmp_path):
    folder = tmp_path / "thesis"
    (folder / "chapter").mkdir(parents=True)
    (folder / "chapter" / "results.csv").write_text("case,dice\n1,0.9\n")
    (folder / "notes.txt").write_text("do not lose")
    return folder, fingerprint(folder)


def test_train_overwrite_replaces_its_own_run_but_never_a_users_folder(phantoms_2d, tmp_path, capsys):
    folder, before = users_folder(tmp_path)
    assert main(["train", str(phantoms_2d), "--out", str(folder), "--overwrite", *TINY]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "medseg did not write this folder" in error[0] and str(folder) in error[0]
    assert fingerprint(folder) == before
    run = tmp_path / "run"
    assert main(["train", str(phantoms_2d), "--out", str(run), *TINY]) == 0
    assert (run / MARKER).is_file()
    (run / "stale.txt").write_text("from the first run")
    assert main(["train", str(phantoms_2d), "--out", str(run), "--overwrite", *TINY]) == 0
    assert not (run / "stale.txt").exists() and (run / "best.pt").exists()


def test_evaluate_out_never_replaces_a_users_folder(trained_2d, tmp_path, capsys):
    folder, before = users_folder(tmp_path)
    assert main(["evaluate", str(trained_2d), "--out", str(folder), "--quiet", "--figures", "0"]) == 2
    assert "medseg did not write this folder" in capsys.readouterr().err
    assert fingerprint(folder) == before
    out = tmp_path / "evaluation"
    for _ in range(2):  # the second time replaces the first evaluation, which medseg marked
        assert main(["evaluate", str(trained_2d), "--out", str(out), "--quiet", "--figures", "0"]) == 0
        assert (out / MARKER).is_file() and (out / "summary.json").exists()


def test_predict_never_writes_over_an_input(trained_2d, phantoms_2d, tmp_path, capsys):
    images = phantoms_2d / "imagesTr"
    before = fingerprint(images)
    assert main(["predict", str(trained_2d), str(images), "--out", str(images), "--quiet"]) == 2
    assert "would overwrite an input file" in capsys.readouterr().err
    assert fingerprint(images) == before

import time

from PIL import Image as PILImage

from medseg.demo import run_demo


def test_demo_meets_its_promise(tmp_path):
    """Item 12: phantoms, a CPU-sized U-Net trained, evaluated and drawn in under 3 minutes, Dice >= 0.90."""
    started = time.monotonic()
    summary = run_demo(tmp_path / "demo", progress=False)
    seconds = time.monotonic() - started
    assert seconds < 180, f"demo took {seconds:.0f} s"
    assert summary["mean_dice"] >= 0.90
    run = tmp_path / "demo" / "run"
    assert (run / "curves.png").exists() and len(list((run / "evaluation").glob("case_*.png"))) >= 3
    assert PILImage.open(run / "curves.png").size[0] > 1000

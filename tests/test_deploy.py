"""The deployment recipes a hospital can audit: the systemd unit is valid and confined."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "medseg-serve.service"


def runnable_unit(tmp_path: Path) -> Path:
    """The unit with its ExecStart pointed at this Python (verify checks the program exists) and the token file
    optional (this machine has none)."""
    text = UNIT.read_text().replace("/opt/medseg/.venv/bin/medseg", f"{sys.executable} -m medseg")
    text = text.replace("EnvironmentFile=/etc/", "EnvironmentFile=-/etc/")
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def test_the_systemd_unit_is_valid_and_confined(tmp_path):
    if not shutil.which("systemd-analyze"):
        message = "systemd-analyze is not installed (Debian's systemd package; .ci/run installs it)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    settings = dict(re.findall(r"^(\w+)=(.*)$", UNIT.read_text(), re.M))
    assert settings["PrivateTmp"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["NoNewPrivileges"] == "yes" and settings["DynamicUser"] == "yes"  # never root
    assert "--host 127.0.0.1" in settings["ExecStart"]  # behind the proxy, which terminates TLS
    unit = runnable_unit(tmp_path)
    verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr  # a typo only warns: no output
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                              text=True, timeout=120)
    level = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", security.stdout)
    assert level and float(level.group(1)) <= 4.0, security.stdout[-500:]  # systemd calls <= 4.0 "OK"


def test_an_sbom_of_the_environment_names_every_dependency_with_its_version(tmp_path):
    """.ci/run writes the same SBOM (CycloneDX JSON) of the environment the tests ran in."""
    import json
    import tomllib

    from packaging.requirements import Requirement

    tool = Path(sys.executable).parent / "cyclonedx-py"
    if not tool.exists():
        pytest.skip("cyclonedx-bom is not installed (the test extra installs it)")
    out = tmp_path / "sbom.cdx.json"
    subprocess.run([str(tool), "environment", sys.executable, "--of", "JSON", "-o", str(out)], check=True,
                   capture_output=True, timeout=300)
    sbom = json.loads(out.read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    components = {c["name"].lower().replace("_", "-"): c.get("version") for c in sbom["components"]}
    import torch

    assert components["torch"] == torch.__version__
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name = Requirement(line).name.lower()
        assert components.get(name), f"{name} missing from the SBOM"


CONTAINERFILE = ROOT / "deploy" / "Containerfile"


def test_the_container_recipe_runs_unprivileged_on_a_read_only_root_with_a_health_check():
    """The recipe's properties, as text: CI cannot build or start a container (docs/deploy.md, "Not there yet")."""
    import json

    from medseg.cli import build_parser

    text = CONTAINERFILE.read_text()
    instructions = re.sub(r"\\\n\s*", " ", "\n".join(l for l in text.splitlines() if not l.startswith("#")))
    users = re.findall(r"^USER (\S+)", instructions, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")  # the last USER is who runs the server
    health = re.search(r"^HEALTHCHECK .*CMD (\[.*\])$", instructions, re.M)
    assert health and "/healthz" in health.group(1)
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", instructions, re.M).group(1))
    assert entry[:3] == ["medseg", "serve", "/model"]
    args = build_parser().parse_args(entry[1:])  # the arguments the server is started with are its own
    assert args.host == "0.0.0.0" and "--token" not in entry  # the token from MEDSEG_TOKEN, or the bind is refused
    assert "torch==2.13.0" in instructions and "download.pytorch.org/whl/cpu" in instructions  # never CUDA's
    run = re.sub(r"\\\n#\s*", " ", text).split("podman run", 1)[1].splitlines()[0]  # the documented command
    tmpdir = re.search(r"^ENV .*TMPDIR=(\S+)", instructions, re.M).group(1)
    for option in ("--read-only", f"--tmpfs {tmpdir}:", "mode=0700,U", "--cap-drop=ALL",
                   "no-new-privileges", "--env-file", ":/model:ro", "-p 127.0.0.1:"):
        assert option in run, option

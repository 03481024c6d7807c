"""The shipped wheel (what the operator image installs) holds what runs in the pod, and no
development tools: no local cluster, no test helpers or attack programs, no demo."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_the_operator_and_no_development_tools(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("reactor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[1] for name in names if name.startswith("reactor/") and name.count("/") > 1}
    assert {"infra", "workflow", "opencode", "kube", "cli", "observe"} <= packages
    assert not packages & {"devcluster", "testing"}, packages
    assert "reactor/demo.py" not in names
    assert not [name for name in names if name.startswith("reactor_dev")]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in requires if "cryptography" in line], requires  # the dev cluster's PKI only

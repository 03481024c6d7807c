"""What the repository ships for deployment, as the tests read it: manifests, examples, CRDs,
and the identity the shipped RBAC gives the operator."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]  # the repository
MANIFESTS = ROOT / "manifests"
EXAMPLES = ROOT / "examples"
CRD = ROOT / "crds" / "agenttask.yaml"
CRDS = [CRD, ROOT / "crds" / "spendlimit.yaml", ROOT / "crds" / "mergequeue.yaml"]  # what the operator watches
SA_USER = "system:serviceaccount:reactor-system:reactor"
SA_GROUPS = ["system:serviceaccounts", "system:serviceaccounts:reactor-system", "system:authenticated"]


def load_all(path: Path) -> list[dict]:
    """The documents of a YAML file, empty ones left out."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]

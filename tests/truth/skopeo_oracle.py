"""A second, independent oracle: Debian's skopeo (containers/image) choosing an index instance.

`python -m tests.truth.skopeo_oracle` runs `skopeo --debug copy --override-os/--override-arch/
--override-variant SRC dir:...` for every generated layout whose root is an index, for each node the
CRI-O truth answers for, and records the instance skopeo logs ("copying (only) instance ...") or its
error, into tests/truth/skopeo.json.gz. OCI indexes are read through the `oci:` transport, Docker
lists through `dir:` (skopeo's oci: layout reader does not resolve a Docker list). skopeo 1.9 links an
older containers/image than CRI-O 1.34's v5.36: tests/unit/test_differential.py lists where they differ.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.truth.cases import HERE, load

SKOPEO = HERE / "skopeo.json.gz"
_CHOSEN = re.compile(r"copying \(only\) instance (sha256:[0-9a-f]{64})")
_FATAL = re.compile(r'level=fatal msg="(.*)"')


def crio_variant(node: dict[str, Any]) -> str:
    """The variant CRI-O's getCPUVariant reports on such a node (the truth tables' rule)."""
    arch, os_ = node.get("architecture", ""), node.get("os", "")
    if os_ in ("darwin", "windows"):
        return {"arm64": "v8", "arm": "v7"}.get(arch, "")
    if arch == "arm64":
        return "v8"
    if arch == "arm":
        return node.get("variant", "") or "v7"
    return ""


def run(skopeo: str = "skopeo") -> dict[str, Any]:
    cases, _answers = load()
    blobs = {d: base64.b64decode(b) for d, b in cases["blobs"].items()}
    version = subprocess.run([skopeo, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    out: dict[str, Any] = {"generator": version, "layouts": []}
    with tempfile.TemporaryDirectory() as tmp:
        layout = Path(tmp) / "layout"
        (layout / "blobs" / "sha256").mkdir(parents=True)
        (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        for d, b in blobs.items():
            (layout / "blobs" / "sha256" / d[7:]).write_bytes(b)
        entries = [
            dict(x["root"], annotations={"org.opencontainers.image.ref.name": f"case-{i}"})
            for i, x in enumerate(cases["layouts"])
        ]
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
        for i, case in enumerate(cases["layouts"]):
            root = case["root"]
            if "index" not in root["mediaType"] and "list" not in root["mediaType"]:
                continue
            if "docker" in root["mediaType"]:
                src_dir = Path(tmp) / f"dir-{i}"
                src_dir.mkdir()
                (src_dir / "version").write_text("Directory Transport Version: 1.1\n")
                (src_dir / "manifest.json").write_bytes(blobs[root["digest"]])
                for e in json.loads(blobs[root["digest"]])["manifests"]:
                    (src_dir / f"{e['digest'][7:]}.manifest.json").write_bytes(blobs[e["digest"]])
                src = f"dir:{src_dir}"
            else:
                src = f"oci:{layout}:case-{i}"
            nodes = []
            for node in case["nodes"]:
                argv = [skopeo, "--debug", "--override-os", node["os"], "--override-arch", node["architecture"]]
                if crio_variant(node):
                    argv += ["--override-variant", crio_variant(node)]
                dest = Path(tmp) / "out"
                subprocess.run(["rm", "-rf", str(dest)], check=True)
                p = subprocess.run([*argv, "copy", src, f"dir:{dest}"], capture_output=True, text=True)
                m = _CHOSEN.search(p.stderr)
                got: dict[str, Any] = {"node": node}
                if m:
                    got["digest"] = m.group(1)
                else:
                    f = _FATAL.search(p.stderr)
                    text = f.group(1).replace('\\"', '"') if f else "\n".join(p.stderr.strip().splitlines()[-1:])
                    got["error"] = text.replace(src, "SRC")
                nodes.append(got)
            out["layouts"].append({"name": case["name"], "nodes": nodes})
    return out


def main() -> int:
    result = run(*sys.argv[1:2])
    with gzip.GzipFile(SKOPEO, "wb", mtime=0) as f:
        f.write(json.dumps(result, indent=1, sort_keys=True).encode() + b"\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Selection and runtime predictions on every Core fixture, read from a real OCI layout."""

from __future__ import annotations

import pytest

from imagevol.errors import NoMatchError
from imagevol.platform import parse_platform_list
from imagevol.reference import parse_any
from imagevol.resolve.explain import predict
from imagevol.resolve.select import select_manifest
from imagevol.sources.layout import LayoutSource
from tests.support.fixtures import ALL, build_core_layout, expectations


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("core") / "layout"
    build_core_layout(path)
    return path


@pytest.mark.parametrize(("fixture", "node", "runtime", "policy", "expected"), expectations())
def test_runtime_table(layout, fixture, node, runtime, policy, expected) -> None:
    source = LayoutSource(parse_any(f"oci:{layout}:{fixture}"))
    resolved = source.resolve()
    out = predict(source, resolved, parse_platform_list(node), runtime, policy)
    status, position, kind = expected
    assert ("mounts" if out.mounts else "fails") == status, (out.summary, out.error)
    if status == "fails":
        assert out.exit_code in (3, 4)
        return
    sel = out.selection
    assert sel is not None
    assert sel.manifest.kind == kind
    if position is None:
        assert sel.how == "direct"
    else:
        assert sel.steps[-1].chosen == position


@pytest.mark.parametrize("fixture", ALL)
def test_every_fixture_resolves(layout, fixture) -> None:
    source = LayoutSource(parse_any(f"oci:{layout}:{fixture}"))
    desc, doc = source.resolve()
    assert str(desc.digest).startswith("sha256:")
    assert doc.digest == desc.digest


def test_crio_error_text_names_wanted_platform(layout) -> None:
    source = LayoutSource(parse_any(f"oci:{layout}:four-platform"))
    out = predict(source, source.resolve(), parse_platform_list("linux/arm/v6"), "crio", "native")
    inner = 'no image found in image index for architecture "arm", variant "v6", OS "linux"'
    assert out.error == (
        "unable to pull image or OCI artifact: pull image err: choosing an image from manifest list "
        f"oci:{layout}:four-platform: {inner}; artifact err: choose instance: {inner}"
    )
    source = LayoutSource(parse_any(f"oci:{layout}:docker-list"))
    out = predict(source, source.resolve(), parse_platform_list("linux/arm/v6"), "crio", "native")
    inner = 'no image found in manifest list for architecture "arm", variant "v6", OS "linux"'
    assert out.error == (
        "unable to pull image or OCI artifact: pull image err: choosing an image from manifest list "
        f"oci:{layout}:docker-list: {inner}; artifact err: provided artifact is a container image"
    )


def test_arm64_node_error_mentions_v8(tmp_path) -> None:
    from tests.support.layout import LayoutWriter, plat

    w = LayoutWriter(tmp_path / "l")
    w.tag(w.index([(w.image({"a": b"x"}, arch="amd64"), plat("linux", "amd64"))]), "amd64-only")
    src = LayoutSource(parse_any(f"oci:{tmp_path / 'l'}:amd64-only"))
    out = predict(src, src.resolve(), parse_platform_list("linux/arm64"), "crio", "native")
    # CRI-O on an arm64 node auto-detects variant v8 and names it (cri-o#8781).
    assert out.error is not None
    assert 'no image found in image index for architecture "arm64", variant "v8", OS "linux"' in out.error


def test_any_policy_warns_naming_platform(layout) -> None:
    source = LayoutSource(parse_any(f"oci:{layout}:arm64-only"))
    sel = select_manifest(source, parse_platform_list("linux/amd64"), policy="any")
    assert sel.how == "fallback"
    assert "linux/arm64/v8" in sel.warnings[0]


def test_native_no_match_hint(layout) -> None:
    source = LayoutSource(parse_any(f"oci:{layout}:arm64-only"))
    with pytest.raises(NoMatchError) as ei:
        select_manifest(source, parse_platform_list("linux/amd64"))
    assert ei.value.exit_code == 3
    assert "--platform-policy any" in (ei.value.hint or "")
    assert "linux/arm64/v8" in (ei.value.hint or "")


def test_preference_list_order(layout) -> None:
    source = LayoutSource(parse_any(f"oci:{layout}:four-platform"))
    sel = select_manifest(source, parse_platform_list("linux/s390x,linux/amd64"))
    assert str(sel.platform) == "linux/s390x"
    sel = select_manifest(source, parse_platform_list("linux/riscv64,linux/arm/v7"))
    assert str(sel.platform) == "linux/arm/v7"


def test_digest_of_child_used_as_is(layout) -> None:
    source = LayoutSource(parse_any(f"oci:{layout}:four-platform"))
    _, index = source.resolve()
    child = index.manifests[3]  # s390x
    src2 = LayoutSource(parse_any(f"oci:{layout}@{child.digest}"))
    sel = select_manifest(src2, parse_platform_list("linux/amd64"))
    assert sel.how == "direct"
    assert sel.descriptor.digest == child.digest


def test_no_match_trace_in_explain(layout) -> None:
    """explain keeps the per-entry verdicts when nothing matches, with what the node accepts."""
    source = LayoutSource(parse_any(f"oci:{layout}:four-platform"))
    out = predict(source, source.resolve(), parse_platform_list("linux/arm/v6"), "imagevol", "native")
    assert not out.mounts and out.steps
    verdicts = {e.platform: e for e in out.steps[0].entries}
    assert all(e.verdict == "no-match" for e in verdicts.values())
    assert "linux/arm/v6" in verdicts["linux/arm/v7"].note
    assert out.to_dict()["steps"][0]["entries"][2]["note"] == verdicts["linux/arm/v7"].note

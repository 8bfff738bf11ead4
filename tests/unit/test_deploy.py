"""The Kubernetes deployment in deploy/: schema-valid objects that agree with each other and with imagevol.

Every YAML document is validated offline against the Kubernetes OpenAPI schemas bundled in
`kubernetes-validate` (strict: unknown fields fail), for the oldest Kubernetes the deployment
targets and the newest the package knows. The cross-checks then catch what a schema cannot: the
driver name, socket and registration paths that must be identical in several places, the plugin's
arguments against imagevol's `csi` interface, mount propagation, privilege, the registries.conf
that the init container renders (run for real, parsed with imagevol's own parser), the example
pod's volume attributes and the Dockerfile. Several checks are run on a broken copy too, to show
that they can fail.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from imagevol.platform import parse_platform_list
from imagevol.reference import parse_reference
from imagevol.registry.egress import EgressPolicy
from imagevol.registry.regconf import load_registries_conf, pull_endpoints
from imagevol.registry.transport import RegistryOptions
from imagevol.sources.factory import pull_hosts
from tests.support.need import need_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DRIVER = "csi.imagevol.io"
NAMESPACE = "imagevol-system"
# The oldest Kubernetes the deployment is for (CSIDriver v1 fields, sidecar images) and the
# newest schema set kubernetes-validate bundles at the version pyproject.toml asks for.
K8S_VERSIONS = ("1.31", "1.37")
NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "example-pod.yaml"}

# The `imagevol csi` interface (docs/kubernetes.md): flag -> kind of value. Global flags come
# before the `csi` command, the others after it.
GLOBAL_FLAGS = {"--root": "abspath"}
CSI_FLAGS = {
    "--endpoint": "unix-endpoint",
    "--node-id": "node-id",
    "--driver-name": "driver",
    "--metrics-port": "port",
    "--metrics-host": "host",
    "--platform": "platform",
    "--tls-verify": "bool",
    "--cert-dir": "abspath",
    "--authfile": "abspath",
    "--registries-conf": "abspath",
    "--timeout": "seconds",
    "--allow-registry": "registry-glob",
    "--node-address": "node-ip",
}
VOLUME_ATTRIBUTES = {"image", "platform", "platformPolicy", "pullPolicy", "subPath"}


# ---------------------------------------------------------------------------------------------
# Loading


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.iterdir() if p.suffix in (".yaml", ".yml"))


def _load(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in _yaml_files():
        if path.name == "kustomization.yaml":
            continue
        out.extend((path.name, doc) for doc in _load(path))
    return out


OBJECTS = _objects()


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in OBJECTS if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _daemonset() -> dict[str, Any]:
    return _one("DaemonSet")


def _container(pod_spec: dict[str, Any], name: str, *, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    found = [c for c in pod_spec.get(key, []) if c["name"] == name]
    assert len(found) == 1, f"expected one {key[:-1]} {name!r}"
    return found[0]


def _volumes(pod_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec.get("volumes", [])}


def _mount(container: dict[str, Any], volume: str) -> dict[str, Any]:
    found = [m for m in container.get("volumeMounts", []) if m["name"] == volume]
    assert len(found) == 1, f"container {container['name']} mounts volume {volume!r} {len(found)} times"
    return found[0]


def _flag_values(args: list[str]) -> dict[str, str]:
    """`--flag=value` / `--flag value` pairs of a sidecar's arguments."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            out[k] = v
        elif a.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[a] = args[i + 1]
            i += 1
        else:
            out[a] = ""
        i += 1
    return out


def _plugin_command(container: dict[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The plugin's (global, csi) options as (flag, value) pairs; asserts the command shape."""
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv and Path(argv[0]).name == "imagevol", f"the plugin must run imagevol, not {argv[:1]}"
    assert "csi" in argv, "the plugin must run `imagevol ... csi ...`"
    split = argv.index("csi")

    def pairs(items: list[str], table: dict[str, str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        i = 0
        while i < len(items):
            item = items[i]
            assert item.startswith("--"), f"unexpected positional argument {item!r}"
            if "=" in item:
                flag, value = item.split("=", 1)
            else:
                assert i + 1 < len(items), f"{item} needs a value"
                flag, value = item, items[i + 1]
                i += 1
            assert flag in table, f"{flag} is not an option of `imagevol{' csi' if table is CSI_FLAGS else ''}`"
            out.append((flag, value))
            i += 1
        return out

    return pairs(argv[1:split], GLOBAL_FLAGS), pairs(argv[split + 1 :], CSI_FLAGS)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------------------------------------
# Schema validation


def test_every_file_loads() -> None:
    names = {p.name for p in _yaml_files()}
    expected = {
        "namespace.yaml",
        "csidriver.yaml",
        "daemonset.yaml",
        "registries-conf.yaml",
        "example-pod.yaml",
        "kustomization.yaml",
    }
    assert expected <= names
    kinds = sorted(d["kind"] for _, d in OBJECTS)
    assert kinds == sorted(["Namespace", "CSIDriver", "ServiceAccount", "DaemonSet", "ConfigMap", "Pod"])
    for name, doc in OBJECTS:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), name
        assert doc["metadata"].get("name"), name


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "obj", [d for _, d in OBJECTS], ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in OBJECTS]
)
def test_schema_strict(obj: dict[str, Any], version: str) -> None:
    assert kubernetes_validate.validate(obj, version, strict=True) == version


def test_strict_validation_refuses_unknown_and_mistyped_fields() -> None:
    ds = copy.deepcopy(_daemonset())
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # typo of volumeMounts
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[0], strict=True)

    pod = copy.deepcopy(_one("Pod"))
    pod["spec"]["volumes"][0]["csi"]["volumeAttribute"] = {}  # typo of volumeAttributes
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)

    driver = copy.deepcopy(_one("CSIDriver"))
    driver["spec"]["attachRequired"] = "no"  # not a boolean
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(driver, K8S_VERSIONS[0], strict=True)


def test_validation_is_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The schemas ship with the package: validating opens no network connection."""

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("kubernetes-validate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for version in K8S_VERSIONS:
        for _, obj in OBJECTS:
            kubernetes_validate.validate(obj, version, strict=True)


# ---------------------------------------------------------------------------------------------
# Kustomization and namespaces


def test_kustomization_lists_the_install_manifests() -> None:
    (kust,) = _load(DEPLOY / "kustomization.yaml")
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kust["kind"] == "Kustomization"
    resources = kust["resources"]
    assert len(resources) == len(set(resources))
    expected = {p.name for p in _yaml_files()} - NOT_IN_KUSTOMIZATION
    assert set(resources) == expected
    # The Namespace comes before the objects that live in it.
    assert resources[0] == "namespace.yaml"


def test_kubectl_kustomize_renders_the_same_objects() -> None:
    need_tool("kubectl")
    argv = ["kubectl", "kustomize", str(DEPLOY)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    expected = [d for f, d in OBJECTS if f not in NOT_IN_KUSTOMIZATION]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, rendered)) == sorted(map(key, expected))
    by_key = {key(d): d for d in rendered}
    for d in expected:
        assert by_key[key(d)] == d, f"kustomize changed {key(d)}"


def test_namespaced_objects_live_in_the_namespace() -> None:
    ns = _one("Namespace")
    assert ns["metadata"]["name"] == NAMESPACE
    # Privileged pods must be admitted whatever the cluster's Pod Security default.
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for f, d in OBJECTS:
        if d["kind"] in ("ServiceAccount", "DaemonSet", "ConfigMap"):
            assert d["metadata"].get("namespace") == NAMESPACE, f"{f}: {d['kind']}"


# ---------------------------------------------------------------------------------------------
# CSIDriver


def test_csidriver() -> None:
    d = _one("CSIDriver")
    assert d["apiVersion"] == "storage.k8s.io/v1"
    assert d["metadata"]["name"] == DRIVER
    spec = d["spec"]
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert spec["volumeLifecycleModes"] == ["Ephemeral"]
    assert spec["fsGroupPolicy"] == "None"
    assert spec["requiresRepublish"] is False


# ---------------------------------------------------------------------------------------------
# DaemonSet


def deployment_problems(ds: dict[str, Any], driver: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    """Everything that must agree between the DaemonSet, the CSIDriver and the example pod."""
    problems: list[str] = []
    spec = ds["spec"]["template"]["spec"]
    vols = _volumes(spec)
    plugin = _container(spec, "imagevol")
    registrar = _container(spec, "node-driver-registrar")
    probe = _container(spec, "liveness-probe")
    _global, csi = _plugin_command(plugin)
    opts = dict(csi)

    # One driver name everywhere.
    name = driver["metadata"]["name"]
    if opts.get("--driver-name", DRIVER) != name:
        problems.append(f"--driver-name {opts.get('--driver-name')} != CSIDriver {name}")
    for v in pod["spec"]["volumes"]:
        if "csi" in v and v["csi"]["driver"] != name:
            problems.append(f"example pod uses driver {v['csi']['driver']}, CSIDriver is {name}")

    # The socket: the plugin listens in the plugin-dir mount; the sidecars dial the same path;
    # the kubelet is told the host path of that same file; the directory is named after the driver.
    endpoint = opts["--endpoint"]
    sock = endpoint.removeprefix("unix://")
    plugin_dir_host = vols["plugin-dir"]["hostPath"]["path"].rstrip("/")
    plugin_dir_mount = _mount(plugin, "plugin-dir")["mountPath"].rstrip("/")
    if os.path.dirname(sock) != plugin_dir_mount:
        problems.append(f"socket {sock} is not in the plugin-dir mount {plugin_dir_mount}")
    for side in (registrar, probe):
        addr = _flag_values(side["args"]).get("--csi-address", "")
        if addr.removeprefix("unix://") != sock:
            problems.append(f"{side['name']} dials {addr}, the plugin listens on {sock}")
        if _mount(side, "plugin-dir")["mountPath"].rstrip("/") != plugin_dir_mount:
            problems.append(f"{side['name']} mounts plugin-dir elsewhere")
    reg_path = _flag_values(registrar["args"]).get("--kubelet-registration-path")
    want = f"{plugin_dir_host}/{os.path.basename(sock)}"
    if reg_path != want:
        problems.append(f"--kubelet-registration-path {reg_path} != plugin-dir hostPath + socket {want}")
    if plugin_dir_host != f"/var/lib/kubelet/plugins/{name}":
        problems.append(f"plugin-dir {plugin_dir_host} is not /var/lib/kubelet/plugins/{name}")
    if vols["registration-dir"]["hostPath"]["path"].rstrip("/") != "/var/lib/kubelet/plugins_registry":
        problems.append("registration-dir is not the kubelet's plugins_registry")
    if _mount(registrar, "registration-dir")["mountPath"] != "/registration":
        problems.append("the registrar must see plugins_registry at /registration")

    # The kubelet's directory: same path as on the host (targets arrive as host paths),
    # Bidirectional so the published bind mounts reach the host.
    kubelet = _mount(plugin, "kubelet-dir")
    if kubelet["mountPath"] != vols["kubelet-dir"]["hostPath"]["path"]:
        problems.append("the kubelet directory must be mounted at its host path")
    if kubelet.get("mountPropagation") != "Bidirectional":
        problems.append(f"kubelet-dir propagation is {kubelet.get('mountPropagation')}, not Bidirectional")
    if not plugin_dir_host.startswith(kubelet["mountPath"] + "/"):
        problems.append("plugin-dir is not under the kubelet directory")

    # Every container that may create mounts seen outside it is privileged (the API server
    # refuses Bidirectional otherwise; bind mounts need CAP_SYS_ADMIN anyway).
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        bidi = [m["name"] for m in c.get("volumeMounts", []) if m.get("mountPropagation") == "Bidirectional"]
        privileged = (c.get("securityContext") or {}).get("privileged") is True
        if bidi and not privileged:
            problems.append(f"container {c['name']} has Bidirectional mounts {bidi} but is not privileged")
        if c is not plugin and privileged:
            problems.append(f"container {c['name']} is privileged and needs not be")
    if (plugin.get("securityContext") or {}).get("privileged") is not True:
        problems.append("the plugin container, which mounts, is not privileged")

    # The store: --root is the store's mount, at the host path, HostToContainer (see daemonset.yaml).
    root = dict(_global).get("--root")
    store = _mount(plugin, "store")
    if root != store["mountPath"] or root != vols["store"]["hostPath"]["path"]:
        problems.append(f"--root {root} is not the store hostPath mounted at the same path")
    if store.get("mountPropagation") != "HostToContainer":
        problems.append(f"store propagation is {store.get('mountPropagation')}, not HostToContainer")

    # --node-id comes from the node's name.
    if opts.get("--node-id") != "$(NODE_ID)":
        problems.append("--node-id must be $(NODE_ID)")
    node_id = _env(plugin).get("NODE_ID", {})
    if node_id.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        problems.append("NODE_ID must come from spec.nodeName")

    # Ports: metrics and healthz as named container ports matching the flags and the probe.
    ports = {p["name"]: p["containerPort"] for p in plugin.get("ports", [])}
    metrics_port = int(opts.get("--metrics-port", "9809"))
    if ports.get("metrics") != metrics_port:
        problems.append(f"port 'metrics' {ports.get('metrics')} != --metrics-port {metrics_port}")
    annotations = ds["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/port", str(metrics_port)) != str(metrics_port):
        problems.append("prometheus.io/port annotation disagrees with --metrics-port")
    health_port = int(_flag_values(probe["args"]).get("--health-port", "9808"))
    if ports.get("healthz") != health_port:
        problems.append(f"port 'healthz' {ports.get('healthz')} != liveness-probe --health-port {health_port}")
    if plugin.get("livenessProbe", {}).get("httpGet", {}).get("port") != "healthz":
        problems.append("the plugin's livenessProbe does not use the liveness-probe sidecar's port")
    probe_timeout = _flag_values(probe["args"]).get("--probe-timeout", "1s")
    if plugin["livenessProbe"].get("timeoutSeconds", 1) <= int(probe_timeout.removesuffix("s")):
        problems.append("the kubelet's probe timeout must exceed the sidecar's --probe-timeout")
    all_ports = [p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])]
    if len(all_ports) != len(set(all_ports)):
        problems.append(f"two containers use the same port: {all_ports}")
    return problems


def _ds_driver_pod() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    return copy.deepcopy(_daemonset()), copy.deepcopy(_one("CSIDriver")), copy.deepcopy(_one("Pod"))


def test_deployment_agrees_with_itself() -> None:
    assert deployment_problems(*_ds_driver_pod()) == []


def _plugin_of(ds: dict[str, Any]) -> dict[str, Any]:
    return _container(ds["spec"]["template"]["spec"], "imagevol")


def _set_arg(container: dict[str, Any], flag: str, value: str) -> None:
    container["args"] = [f"{flag}={value}" if a.startswith(flag + "=") else a for a in container["args"]]


def _break_driver_name(ds, driver, pod):
    driver["metadata"]["name"] = "csi.example.io"


def _break_registration_path(ds, driver, pod):
    reg = _container(ds["spec"]["template"]["spec"], "node-driver-registrar")
    _set_arg(reg, "--kubelet-registration-path", "/var/lib/kubelet/plugins/other/csi.sock")


def _break_propagation(ds, driver, pod):
    _mount(_plugin_of(ds), "kubelet-dir")["mountPropagation"] = "HostToContainer"


def _break_privilege(ds, driver, pod):
    _plugin_of(ds)["securityContext"]["privileged"] = False


def _break_socket(ds, driver, pod):
    _set_arg(_plugin_of(ds), "--endpoint", "unix:///tmp/csi.sock")


def _break_metrics_port(ds, driver, pod):
    _set_arg(_plugin_of(ds), "--metrics-port", "9100")


def _break_store(ds, driver, pod):
    _set_arg(_plugin_of(ds), "--root", "/var/lib/other")


@pytest.mark.parametrize(
    "breaker",
    [
        _break_driver_name,
        _break_registration_path,
        _break_propagation,
        _break_privilege,
        _break_socket,
        _break_metrics_port,
        _break_store,
    ],
)
def test_cross_checks_catch_a_broken_copy(breaker) -> None:
    ds, driver, pod = _ds_driver_pod()
    breaker(ds, driver, pod)
    assert deployment_problems(ds, driver, pod), f"{breaker.__name__} went unnoticed"


def test_unknown_plugin_flag_is_refused() -> None:
    ds = copy.deepcopy(_daemonset())
    _plugin_of(ds)["args"].append("--pull-timeout=600")
    with pytest.raises(AssertionError, match="--pull-timeout is not an option"):
        _plugin_command(_plugin_of(ds))


def _check_value(flag: str, kind: str, value: str) -> None:
    if kind == "abspath":
        assert value.startswith("/") and "\n" not in value, f"{flag}={value!r} is not an absolute path"
    elif kind == "unix-endpoint":
        assert re.fullmatch(r"unix:///[^\s]+\.sock", value), f"{flag}={value!r} is not unix:///PATH.sock"
    elif kind == "node-id":
        assert value, f"{flag} is empty"
    elif kind == "driver":
        assert value == DRIVER, f"{flag}={value!r}"
    elif kind == "port":
        assert value.isdigit() and 0 <= int(value) <= 65535, f"{flag}={value!r} is not a port"
    elif kind == "host":
        socket.inet_pton(socket.AF_INET6 if ":" in value else socket.AF_INET, value)
    elif kind == "platform":
        parse_platform_list(value)
    elif kind == "bool":
        assert value.lower() in ("true", "false", "1", "0", "yes", "no"), f"{flag}={value!r} is not a boolean"
    elif kind == "seconds":
        assert float(value) > 0, f"{flag}={value!r}"
    elif kind == "node-ip":
        assert value == "$(NODE_IP)", f"{flag}={value!r} is not the node's IP from the downward API"
    elif kind == "registry-glob":
        (entry,) = EgressPolicy.parse([value]).allow
        # The shipped list names registries; an entry naming an address would admit node-local ones.
        assert not entry.is_address, f"{flag}={value!r} names an address"
    else:  # pragma: no cover - a kind added to the table without a check
        raise AssertionError(f"no check for {kind}")


def test_plugin_arguments_follow_the_csi_interface() -> None:
    plugin = _plugin_of(_daemonset())
    global_opts, csi_opts = _plugin_command(plugin)
    for flag, value in global_opts:
        _check_value(flag, GLOBAL_FLAGS[flag], value)
    for flag, value in csi_opts:
        _check_value(flag, CSI_FLAGS[flag], value)
    flags = [f for f, _ in csi_opts]
    assert {"--endpoint", "--node-id", "--registries-conf", "--allow-registry"} <= set(flags)
    assert _env(plugin)["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert ("--node-address", "$(NODE_IP)") in csi_opts
    # Each option once (only --platform and --allow-registry may repeat).
    once = [f for f in flags if f not in ("--platform", "--allow-registry")]
    assert len(once) == len(set(once))
    # Files the plugin is told to read are where a volume puts them.
    mounts = [m["mountPath"].rstrip("/") for m in plugin["volumeMounts"]]
    for flag, value in csi_opts:
        if CSI_FLAGS[flag] == "abspath":
            assert any(value.startswith(m + "/") or value == m for m in mounts), f"{flag}={value} is in no volume"
    # The optional auth secret is reached through DOCKER_CONFIG (a missing --authfile would be an error).
    assert "--authfile" not in flags
    docker_config = _env(plugin)["DOCKER_CONFIG"]["value"]
    assert _mount(plugin, "registry-auth")["mountPath"] == docker_config
    secret = _volumes(_daemonset()["spec"]["template"]["spec"])["registry-auth"]["secret"]
    assert secret["optional"] is True
    assert secret["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]


def _imagevol(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagevol", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_plugin_flags_appear_in_imagevol_csi_help() -> None:
    top = _imagevol("--help")
    assert top.returncode == 0, top.stderr
    global_opts, csi_opts = _plugin_command(_plugin_of(_daemonset()))
    for flag, _ in global_opts:
        assert flag in top.stdout
    help_ = _imagevol("csi", "--help")
    assert help_.returncode == 0, help_.stderr
    for flag, _ in csi_opts:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_.stdout), f"{flag} not in `imagevol csi --help`"


def test_runs_on_every_node() -> None:
    spec = _daemonset()["spec"]["template"]["spec"]
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec.get("hostNetwork", False) is False


def test_volumes_are_defined_and_used() -> None:
    spec = _daemonset()["spec"]["template"]["spec"]
    defined = set(_volumes(spec))
    used = {m["name"] for c in [*spec["initContainers"], *spec["containers"]] for m in c.get("volumeMounts", [])}
    assert used == defined
    sa = _one("ServiceAccount")
    assert spec["serviceAccountName"] == sa["metadata"]["name"]


def test_images_are_pinned() -> None:
    spec = _daemonset()["spec"]["template"]["spec"]
    images = {c["name"]: c["image"] for c in [*spec["initContainers"], *spec["containers"]]}
    assert images["imagevol"] == "ghcr.io/imagevol/imagevol:0.1.0"
    assert images["registries-conf"] == images["imagevol"]
    assert re.fullmatch(r"registry\.k8s\.io/sig-storage/livenessprobe:v\d+\.\d+\.\d+", images["liveness-probe"])
    assert re.fullmatch(
        r"registry\.k8s\.io/sig-storage/csi-node-driver-registrar:v\d+\.\d+\.\d+", images["node-driver-registrar"]
    )


def test_resources_are_set() -> None:
    spec = _daemonset()["spec"]["template"]["spec"]
    for c in [*spec["initContainers"], *spec["containers"]]:
        res = c["resources"]
        assert res["requests"]["memory"] and res["limits"]["memory"], c["name"]
        assert "cpu" not in res.get("limits", {}), f"{c['name']}: a CPU limit throttles pulls"


# ---------------------------------------------------------------------------------------------
# registries.conf: rendered by the init container's own script, parsed by imagevol


def _render(tmp_path: Path, node_ip: str, template: str) -> subprocess.CompletedProcess[str]:
    spec = _daemonset()["spec"]["template"]["spec"]
    init = _container(spec, "registries-conf", init=True)
    assert init["command"] == ["/bin/sh", "-c"]
    (script,) = init["args"]
    src = tmp_path / "config" / "registries.conf"
    out_dir = tmp_path / "etc-containers"
    src.parent.mkdir(exist_ok=True)
    out_dir.mkdir(exist_ok=True)
    src.write_text(template, encoding="utf-8")
    env = dict(os.environ)
    env.update(
        NODE_IP=node_ip,
        TEMPLATE=str(src),
        OUTPUT=str(out_dir / "registries.conf"),
        # `python3` in the script is the image's; here, this interpreter with imagevol.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False)


def _template() -> str:
    return _one("ConfigMap", "imagevol-registries-conf")["data"]["registries.conf"]


def test_init_container_wiring() -> None:
    spec = _daemonset()["spec"]["template"]["spec"]
    init = _container(spec, "registries-conf", init=True)
    plugin = _container(spec, "imagevol")
    env = _env(init)
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    template, output = env["TEMPLATE"]["value"], env["OUTPUT"]["value"]
    vols = _volumes(spec)
    # The template is the ConfigMap's key, mounted where TEMPLATE says.
    cm_mount = _mount(init, "registries-conf-template")
    assert os.path.dirname(template) == cm_mount["mountPath"]
    cm = vols["registries-conf-template"]["configMap"]["name"]
    assert os.path.basename(template) in _one("ConfigMap", cm)["data"]
    # The output lands in the emptyDir the plugin mounts (read-only) where --registries-conf reads.
    assert "emptyDir" in vols["registries-conf"]
    assert os.path.dirname(output) == _mount(init, "registries-conf")["mountPath"]
    plugin_mount = _mount(plugin, "registries-conf")
    assert plugin_mount.get("readOnly") is True
    regconf = dict(_plugin_command(plugin)[1])["--registries-conf"]
    assert regconf == os.path.join(plugin_mount["mountPath"], os.path.basename(output))


@pytest.mark.parametrize(("node_ip", "host"), [("10.1.2.3", "10.1.2.3"), ("fd00::5", "[fd00::5]")])
def test_registries_conf_renders_and_has_the_p2p_mirrors(tmp_path: Path, node_ip: str, host: str) -> None:
    assert "@NODE_IP@" in _template()
    done = _render(tmp_path, node_ip, _template())
    assert done.returncode == 0, done.stderr
    rendered = tmp_path / "etc-containers" / "registries.conf"
    assert "@NODE_IP@" not in rendered.read_text(encoding="utf-8")
    conf = load_registries_conf(str(rendered))

    def mirrors(prefix: str) -> list[tuple[str, bool, str]]:
        (reg,) = [r for r in conf.registries if r.prefix == prefix]
        return [(m.location, m.insecure, m.pull_from_mirror) for m in reg.mirrors]

    spegel = (f"{host}:30020", True, "digest-only")
    dragonfly = (f"{host}:4001", True, "all")
    assert mirrors("docker.io") == [spegel, dragonfly]
    assert mirrors("ghcr.io") == [spegel]

    # What the example pod's pull would try: by digest Spegel first, by tag the registry only.
    repo = "ghcr.io/example/llama-weights"
    by_digest = pull_endpoints(conf, repo, by_digest=True)
    assert [(e.location, r) for e, r in by_digest] == [
        (f"{host}:30020", f"{host}:30020/example/llama-weights"),
        ("ghcr.io", repo),
    ]
    assert [e.location for e, _ in pull_endpoints(conf, repo, by_digest=False)] == ["ghcr.io"]
    # docker.io by tag: Dragonfly (which forwards tag lookups), then Docker Hub.
    hub = pull_endpoints(conf, "docker.io/ai/smollm2", by_digest=False)
    assert [e.location for e, _ in hub] == [f"{host}:4001", "docker.io"]
    # The mirrors are told which registry a request is for (containerd's `ns`), the registries not.
    options = RegistryOptions(registries_conf=str(rendered))
    eps, _ = pull_hosts(parse_reference(f"{repo}@sha256:{'a' * 64}"), options)
    assert [(e.host, e.namespace) for e in eps] == [(f"{host}:30020", "ghcr.io"), ("ghcr.io", None)]
    eps, _ = pull_hosts(parse_reference("ai/smollm2:360M"), options)
    assert [(e.host, e.namespace) for e in eps] == [(f"{host}:4001", "docker.io"), ("registry-1.docker.io", None)]


def test_broken_registries_conf_stops_the_init_container(tmp_path: Path) -> None:
    broken = _template().replace('pull-from-mirror = "digest-only"', 'pull-from-mirror = "sometimes"', 1)
    done = _render(tmp_path, "10.1.2.3", broken)
    assert done.returncode != 0
    assert "error:" in done.stderr and "sometimes" in done.stderr


# ---------------------------------------------------------------------------------------------
# Example pod


def test_example_pod() -> None:
    pod = _one("Pod")
    (vol,) = [v for v in pod["spec"]["volumes"] if "csi" in v]
    csi = vol["csi"]
    assert csi["driver"] == DRIVER
    assert csi["readOnly"] is True
    attrs = csi["volumeAttributes"]
    assert set(attrs) <= VOLUME_ATTRIBUTES
    ref = parse_reference(attrs["image"])
    # The plugin's --allow-registry list admits the example's registry (and the mirrors of the
    # shipped registries.conf are its operator's, admitted without an entry).
    _, csi_opts = _plugin_command(_plugin_of(_daemonset()))
    policy = EgressPolicy.parse([v for f, v in csi_opts if f == "--allow-registry"])
    assert policy.allows_registry(ref.api_domain), f"{ref.domain} is not in the plugin's --allow-registry list"
    assert not policy.allows_registry("127.0.0.1:5000") and not policy.allows_registry("169.254.169.254")
    assert attrs.get("platformPolicy", "native") in ("native", "any")
    assert attrs.get("pullPolicy", "missing") in ("always", "missing", "never")
    if "platform" in attrs:
        parse_platform_list(attrs["platform"])
    # Every value is a string (volumeAttributes is map[string]string).
    assert all(isinstance(v, str) for v in attrs.values())
    (container,) = pod["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == vol["name"]]
    assert mount["readOnly"] is True
    assert "/models" in " ".join(container["command"]) and mount["mountPath"] == "/models"


# ---------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_builds_the_plugin_image() -> None:
    ins = _dockerfile_instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert re.search(r"apt-get install .*\bmount\b", runs) and "util-linux" in runs
    assert re.search(r"\bpip install \.(\s|$)", runs), "the image must pip install this repository"
    copied = []
    for op, rest in ins:
        if op == "COPY":
            *sources, _dest = shlex.split(rest)
            copied.extend(sources)
    assert {"pyproject.toml", "README.md", "src"} <= set(copied)
    for source in copied:  # relative to the build context, the repository root
        assert (ROOT / source).exists(), source
    # pyproject's readme is among the copied files (setuptools reads it to build).
    assert re.search(r'^readme = "README.md"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert ("ENTRYPOINT", '["imagevol"]') in ins
    # The build-context filter keeps what the COPY lines need.
    ignore = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()]
    ignore = [ln for ln in ignore if ln and not ln.startswith("#")]
    assert ignore[0] == "*"
    for source in copied:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is excluded from the build context"


# ---------------------------------------------------------------------------------------------
# Docs


def test_docs_name_what_the_manifests_use() -> None:
    doc = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    spec = _daemonset()["spec"]["template"]["spec"]
    for c in [*spec["initContainers"], *spec["containers"]]:
        assert c["image"] in doc, f"docs/kubernetes.md does not name {c['image']}"
        for p in c.get("ports", []):
            assert str(p["containerPort"]) in doc, f"docs/kubernetes.md does not name port {p['containerPort']}"
    plugin = _container(spec, "imagevol")
    for m in plugin["volumeMounts"]:
        if m.get("mountPropagation"):
            assert m["mountPropagation"] in doc
    assert "kubectl apply -k deploy/" in doc
    for attr in VOLUME_ATTRIBUTES:
        assert f"`{attr}`" in doc, f"docs/kubernetes.md does not describe the attribute {attr}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/kubernetes.md" in readme

"""contrib/k8s: valid against a current Kubernetes (offline, kubernetes-validate), and wired as
docs/DEPLOY.md says (the layout that heals, probes, grace period, the model a consumer waits for).

The PodMonitor is a Prometheus Operator CRD, whose schema kubernetes-validate does not
ship: it is checked here for what it must point at (the DaemonSet's pods, their `api`
port, /metrics); its schema is checked by a cluster that has the CRD
(`kubectl apply --dry-run=server -f contrib/k8s/podmonitor.yaml`).
"""

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from vfs.manifest import parse_manifest
from vfs.settings import Settings

K8S = Path(__file__).resolve().parent.parent / "contrib" / "k8s"
REPO = K8S.parent.parent
KUBERNETES = kubernetes_validate.latest_version()
CRD_KINDS = {"PodMonitor"}


def documents():
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            yield from ((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)


def the(kind):
    [doc] = [doc for _, doc in documents() if doc["kind"] == kind]
    return doc


def container(pod_spec, name, group="containers"):
    [found] = [c for c in pod_spec[group] if c["name"] == name]
    return found


def volume_of(pod_spec, mount):
    [volume] = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    return volume


@pytest.mark.parametrize("name, doc", [pytest.param(n, d, id=f"{n}:{d['kind']}") for n, d in documents()
                                       if d["kind"] not in CRD_KINDS])
def test_each_object_is_valid_for_a_current_kubernetes(name, doc):
    assert kubernetes_validate.validate(doc, KUBERNETES, strict=True) is not None


def test_kustomization_applies_every_file():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def daemon():
    spec = the("DaemonSet")["spec"]["template"]["spec"]
    return spec, container(spec, "lamina")


def test_the_daemonset_mounts_in_the_layout_that_heals():
    spec, lamina = daemon()
    assert lamina["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in lamina["volumeMounts"]}
    parent = mounts["/host"]
    assert parent["mountPropagation"] == "Bidirectional"
    assert volume_of(spec, parent)["hostPath"]["path"] == "/var/lib/lamina-llm-cache"
    assert volume_of(spec, mounts["/dev/fuse"])["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert volume_of(spec, mounts["/var/cache/lamina-llm-cache"])["hostPath"]["path"] == "/var/cache/lamina-llm-cache"
    assert volume_of(spec, mounts["/etc/lamina-llm-cache"])["configMap"]["name"] == "lamina-llm-cache-models"
    # The image mounts at /host/models (its entrypoint's default), the `models` child of the parent.
    assert "LAMINA_MOUNTPOINT=/host/models" in (REPO / "Dockerfile").read_text()
    assert "LAMINA_MOUNTPOINT" not in {e["name"] for e in lamina["env"]}


def test_the_daemonset_token_probes_and_shutdown():
    spec, lamina = daemon()
    env = {e["name"]: e for e in lamina["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "HF_TOKEN"
    assert env["LAMINA_API"]["value"].endswith(":8765")
    assert lamina["ports"] == [{"name": "api", "containerPort": 8765}]
    assert lamina["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "api"}
    assert lamina["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "api"}
    assert lamina["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "api"}
    assert lamina["lifecycle"]["preStop"]["exec"]["command"] == ["lamina-llm-cache", "unmount", "--lazy", "/host/models"]
    args = lamina["args"]
    read_deadline = float(args[args.index("--read-deadline") + 1])
    assert read_deadline == Settings.read_deadline
    assert spec["terminationGracePeriodSeconds"] > read_deadline


def configmap_manifest():
    return parse_manifest(the("ConfigMap")["data"]["models.yaml"])


def test_the_consumer_binds_the_parent_and_waits_for_a_cached_model_of_its_backend():
    spec = the("Deployment")["spec"]["template"]["spec"]
    daemon_spec, _ = daemon()
    wait = container(spec, "wait-for-model", "initContainers")["command"]
    assert wait[:3] == ["lamina-llm-cache", "wait", "--cached"]
    model = configmap_manifest().get(wait[3])
    server = container(spec, "llama")
    [models] = server["volumeMounts"]
    assert models["mountPropagation"] == "HostToContainer" and models["readOnly"] is True
    assert volume_of(spec, models)["hostPath"]["path"] == volume_of(daemon_spec, {"name": "lamina-root"})["hostPath"]["path"]
    gguf = server["args"][server["args"].index("-m") + 1]
    assert gguf == models["mountPath"] + "/" + model.path.lstrip("/")
    assert model.backend == "llama.cpp"
    # Something fetches what the init container waits for: the DaemonSet's warm container.
    warm = container(daemon_spec, "warm")
    assert {"name": "LAMINA_WARM", "value": model.name} in warm["env"]
    assert "lamina-llm-cache pull $(LAMINA_WARM)" in warm["command"][-1]


def test_the_podmonitor_scrapes_the_daemonset_pods_metrics():
    monitor, daemonset = the("PodMonitor"), the("DaemonSet")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"] == daemonset["spec"]["template"]["metadata"]["labels"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in daemon()[1]["ports"]}
    assert re.fullmatch(r"\d+s", endpoint["interval"])
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(monitor, KUBERNETES, strict=True)


def test_the_configmap_manifest_is_valid_and_names_what_the_shipped_one_names():
    shipped = {spec.name: spec for spec in parse_manifest((REPO / "models.yaml").read_text()).models}
    for spec in configmap_manifest().models:
        assert spec == shipped[spec.name]


def test_the_deploy_doc_names_only_files_that_exist():
    text = (REPO / "docs" / "DEPLOY.md").read_text()
    named = set(re.findall(r"(?:contrib|tests|docs)/[\w./-]+\.(?:yml|yaml|py|sh|service|md)", text))
    named |= {"docs/" + name for name in re.findall(r"\]\((\w+\.md)", text)}
    assert named and sorted(p for p in named if not (REPO / p).exists()) == []

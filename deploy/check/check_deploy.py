#!/usr/bin/env python3
"""Offline checks of everything that deploys syncfleet. Run by script/check-deploy.

Helm chart (helm/syncfleet), for every ci/*.yaml values file:
  - values.schema.json accepts the values; `helm lint --strict` reports nothing;
  - the chart renders with Helm's own engine (helm-python-sdk: Helm's Go SDK, no cluster);
  - every core object validates strictly against the Kubernetes OpenAPI schemas
    (kubernetes-validate), every KEDA / Prometheus Operator object against its CRD schema and,
    for unknown fields, against the same packages' TypeScript types (@kubernetes-models/*, in
    node; deploy/check/validate-crds.mjs);
  - the assertions below: Pod Security "restricted", no `replicas` under autoscaling,
    resources on every container, no secret value outside Secrets, consistent
    app.kubernetes.io/* labels, hook ordering, probes, grace period, monitoring sources.
Negative cases (a typo, a wrong type, a broken invariant) must each be rejected, so every
assertion is shown to be able to fail.
Compose (deploy/compose.yaml) through the real `docker compose config`; Dockerfile through
hadolint.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "syncfleet"
CACHE = ROOT / ".cache"
NODE_MODULES = CACHE / "deploy-node" / "node_modules"
VENV_BIN = pathlib.Path(sys.executable).parent
RELEASE, NAMESPACE = "sf", "syncfleet"
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
COMMON_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)

import helm_python as helm  # noqa: E402
import kubernetes_validate  # noqa: E402
import kubernetes_validate.utils as kv_utils  # noqa: E402

helm.disable_logging()
# kubernetes-validate re-reads its (large) definitions file for every object; read each once.
kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)
KUBE_VERSION = kv_utils.latest_version()


class CheckFailed(Exception):
    pass


@contextlib.contextmanager
def helm_stderr():
    """Helm's chart loader logs an INFO line on stderr for each symlink it follows (files/ links
    to deploy/); those are expected. Anything else Helm writes there is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if "found symbolic link in path" not in line:
                    print(line, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Rendering


def render(chart, values: dict) -> tuple[list[dict], str]:
    """Schema-validates and renders `values`; returns the objects and NOTES.txt."""
    with helm_stderr():
        chart.validate_schema(values)
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects, notes = [], ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__source__"] = path.split("/", 1)[1]
                objects.append(doc)
    return objects, notes


def strip(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "__source__"}


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_specs(objects):
    """(object, pod metadata, pod spec) of every pod the objects would create."""
    for obj in objects:
        kind = obj["kind"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            template = obj["spec"]["template"]
            yield obj, template.get("metadata", {}), template["spec"]
        elif kind == "CronJob":
            template = obj["spec"]["jobTemplate"]["spec"]["template"]
            yield obj, template.get("metadata", {}), template["spec"]
        elif kind == "Pod":
            yield obj, obj["metadata"], obj["spec"]


def containers(spec):
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            yield key, c


# ---------------------------------------------------------------------------------------------
# Assertions: each returns a list of problems (empty = holds).

RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}
SELINUX_TYPES = ("container_t", "container_init_t", "container_kvm_t", "container_engine_t")
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def check_pod_security_restricted(objects, _values):
    """The "restricted" Pod Security Standard (baseline included), per pod and container."""
    problems = []
    for obj, _meta, spec in pod_specs(objects):
        where = name_of(obj)
        psc = spec.get("securityContext") or {}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                problems.append(f"{where}: {flag} is set")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        for vol in spec.get("volumes") or []:
            kinds = set(vol) - {"name"}
            if not kinds <= RESTRICTED_VOLUME_TYPES:
                problems.append(f"{where}: volume {vol.get('name')} of type {sorted(kinds)} is not allowed")
        for sysctl in psc.get("sysctls") or []:
            if sysctl.get("name") not in SAFE_SYSCTLS:
                problems.append(f"{where}: sysctl {sysctl.get('name')} is not allowed")
        if psc.get("runAsUser") == 0:
            problems.append(f"{where}: pod runAsUser is 0")
        pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
        if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
            problems.append(f"{where}: pod seccompProfile {pod_seccomp}")
        for key, c in containers(spec):
            cwhere = f"{where} {key}[{c['name']}]"
            sc = c.get("securityContext") or {}
            if sc.get("privileged"):
                problems.append(f"{cwhere}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cwhere}: allowPrivilegeEscalation is not false")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                problems.append(f"{cwhere}: capabilities.drop lacks ALL")
            if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
                problems.append(f"{cwhere}: adds capabilities {caps.get('add')}")
            non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
            if non_root is not True:
                problems.append(f"{cwhere}: runAsNonRoot is not true")
            if sc.get("runAsUser") == 0:
                problems.append(f"{cwhere}: runAsUser is 0")
            seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{cwhere}: no seccompProfile RuntimeDefault/Localhost")
            if sc.get("procMount") not in (None, "Default"):
                problems.append(f"{cwhere}: procMount {sc.get('procMount')}")
            for ctx in (psc, sc):
                selinux = ctx.get("seLinuxOptions") or {}
                if selinux.get("type") not in (None, "", *SELINUX_TYPES) or selinux.get("user") or selinux.get("role"):
                    problems.append(f"{cwhere}: seLinuxOptions {selinux}")
                if (ctx.get("appArmorProfile") or {}).get("type") == "Unconfined":
                    problems.append(f"{cwhere}: appArmorProfile Unconfined")
                if (ctx.get("windowsOptions") or {}).get("hostProcess"):
                    problems.append(f"{cwhere}: windowsOptions.hostProcess")
            for port in c.get("ports") or []:
                if port.get("hostPort"):
                    problems.append(f"{cwhere}: hostPort {port['hostPort']}")
    return problems


def check_no_replicas_under_autoscaling(objects, _values):
    """A Deployment that a ScaledObject or an HPA scales has no spec.replicas."""
    problems = []
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    scalers = [o for o in objects if o["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
    if sum(o["kind"] == "ScaledObject" for o in scalers) and sum(
        o["kind"] == "HorizontalPodAutoscaler" for o in scalers
    ):
        problems.append("both a ScaledObject and an HPA are rendered")
    for scaler in scalers:
        target = scaler["spec"]["scaleTargetRef"]["name"]
        deployment = deployments.get(target)
        if deployment is None:
            problems.append(f"{name_of(scaler)} targets {target}, which is not rendered")
        elif "replicas" in deployment["spec"]:
            problems.append(f"{name_of(deployment)} sets replicas while {name_of(scaler)} scales it")
    return problems


def check_resources(objects, _values):
    """Every container has cpu and memory requests and a memory limit."""
    problems = []
    for obj, _meta, spec in pod_specs(objects):
        for key, c in containers(spec):
            res = c.get("resources") or {}
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            missing = [f"requests.{r}" for r in ("cpu", "memory") if r not in requests]
            missing += ["limits.memory"] if "memory" not in limits else []
            if missing:
                problems.append(f"{name_of(obj)} {key}[{c['name']}]: no {', '.join(missing)}")
    return problems


def secret_values(values) -> list[str]:
    """Every secret given in the values: secrets.*.value and integrations[].token.value."""
    found = [item.get("value") for item in (values.get("secrets") or {}).values() if isinstance(item, dict)]
    found += [(i.get("token") or {}).get("value") for i in values.get("integrations") or []]
    return [v for v in found if v]


def check_no_secret_outside_secrets(objects, values):
    """No secret value appears in a ConfigMap (or any object but a Secret)."""
    problems = []
    for obj in objects:
        if obj["kind"] == "Secret":
            continue
        text = json.dumps(strip(obj))
        for secret in secret_values(values):
            if secret in text:
                problems.append(f"{name_of(obj)} contains the secret value {secret[:4]}…")
    return problems


def check_labels(objects, _values):
    """One app.kubernetes.io/* label set on every object; components on every pod; selectors match."""
    problems = []
    reference = None
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        missing = [k for k in COMMON_LABELS if k not in labels]
        if missing:
            problems.append(f"{name_of(obj)}: missing labels {missing}")
            continue
        common = {k: labels[k] for k in COMMON_LABELS}
        reference = reference or common
        if common != reference:
            problems.append(f"{name_of(obj)}: labels {common} differ from {reference}")
        if labels["app.kubernetes.io/instance"] != RELEASE:
            problems.append(f"{name_of(obj)}: instance label is not the release name")
    pod_labels = []
    for obj, meta, _spec in pod_specs(objects):
        labels = meta.get("labels") or {}
        pod_labels.append(labels)
        if "app.kubernetes.io/component" not in labels:
            problems.append(f"{name_of(obj)}: pod template has no app.kubernetes.io/component")
        for k in COMMON_LABELS:
            if labels.get(k) != (reference or {}).get(k):
                problems.append(f"{name_of(obj)}: pod label {k}={labels.get(k)}")
        selector = (obj["spec"].get("selector") or {}).get("matchLabels") if obj["kind"] == "Deployment" else None
        if selector is not None:
            if "app.kubernetes.io/component" not in selector:
                problems.append(f"{name_of(obj)}: selector lacks the component label")
            if any(labels.get(k) != v for k, v in selector.items()):
                problems.append(f"{name_of(obj)}: selector {selector} does not match its pod labels")
    for obj in objects:
        if obj["kind"] == "Service":
            selector = obj["spec"].get("selector") or {}
        elif obj["kind"] == "PodDisruptionBudget":
            selector = obj["spec"]["selector"].get("matchLabels") or {}
        else:
            continue
        if not any(all(labels.get(k) == v for k, v in selector.items()) for labels in pod_labels):
            problems.append(f"{name_of(obj)}: selector {selector} matches no pod")
    return problems


def hook(obj):
    annotations = obj["metadata"].get("annotations") or {}
    phases = set((annotations.get("helm.sh/hook") or "").split(",")) - {""}
    return phases, int(annotations.get("helm.sh/hook-weight", "0"))


def check_hook_ordering(objects, values):
    """The migration Job only reads what exists when pre-install hooks run."""
    problems = []
    by_kind_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    for obj in objects:
        if obj["kind"] != "Job":
            continue
        phases, weight = hook(obj)
        if not phases & {"pre-install", "pre-upgrade"}:
            continue
        spec = obj["spec"]["template"]["spec"]
        refs = set()
        for _key, c in containers(spec):
            for env in c.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    refs.add(ref["name"])
        for name in refs:
            secret = by_kind_name.get(("Secret", name))
            if secret is None:
                continue  # an existing Secret, outside the chart
            s_phases, s_weight = hook(secret)
            if not {"pre-install", "pre-upgrade"} <= s_phases or s_weight >= weight:
                problems.append(
                    f"{name_of(obj)} reads {name_of(secret)}, which is not a pre-install/pre-upgrade hook of lower weight"
                )
        sa = spec.get("serviceAccountName")
        created = by_kind_name.get(("ServiceAccount", sa)) if sa else None
        if created is not None and not hook(created)[0]:
            problems.append(f"{name_of(obj)} uses ServiceAccount {sa}, created only after pre-install hooks")
    return problems


def check_workloads(objects, values):
    """Probes on long-running containers; a secret checksum on their pods; worker grace > drain."""
    problems = []
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        template = obj["spec"]["template"]
        if "checksum/secret" not in (template["metadata"].get("annotations") or {}):
            problems.append(f"{name_of(obj)}: no checksum/secret annotation")
        for c in template["spec"]["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    problems.append(f"{name_of(obj)}[{c['name']}]: no {probe}")
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            grace = env.get("SYNCFLEET_WORKER__SHUTDOWN_GRACE_SECS")
            if grace is not None and template["spec"].get("terminationGracePeriodSeconds", 30) <= int(grace):
                problems.append(f"{name_of(obj)}: terminationGracePeriodSeconds does not exceed the drain deadline {grace}s")
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        if "minAvailable" in pdb["spec"]:
            problems.append(f"{name_of(pdb)}: minAvailable blocks drains at one replica; use maxUnavailable")
    return problems


def check_autoscaler_signals(objects, _values):
    """KEDA reads ready + unacked (management API, protocol http) through a TriggerAuthentication."""
    problems = []
    auths = {o["metadata"]["name"] for o in objects if o["kind"] == "TriggerAuthentication"}
    for so in (o for o in objects if o["kind"] == "ScaledObject"):
        for trigger in so["spec"]["triggers"]:
            if trigger["type"] == "rabbitmq":
                if trigger["metadata"].get("protocol") != "http":
                    problems.append(f"{name_of(so)}: rabbitmq trigger without protocol http counts ready messages only")
                if (trigger.get("authenticationRef") or {}).get("name") not in auths:
                    problems.append(f"{name_of(so)}: authenticationRef names no rendered TriggerAuthentication")
        for field in ("pollingInterval", "cooldownPeriod", "fallback"):
            if field not in so["spec"]:
                problems.append(f"{name_of(so)}: no {field}")
    return problems


def check_monitoring_sources(objects, _values):
    """PrometheusRule = deploy/prometheus/rules; dashboard ConfigMap = deploy/grafana/dashboards."""
    problems = []
    rules_file = yaml.safe_load((ROOT / "deploy/prometheus/rules/syncfleet.rules.yml").read_text())
    dashboard_file = json.loads((ROOT / "deploy/grafana/dashboards/syncfleet-fleet.json").read_text())
    for obj in objects:
        if obj["kind"] == "PrometheusRule":
            rendered = copy.deepcopy(obj["spec"]["groups"])
            for group, source in zip(rendered, rules_file["groups"]):
                for rule, src in zip(group.get("rules", []), source.get("rules", [])):
                    extra = set((rule.get("labels") or {})) - set((src.get("labels") or {}))
                    for k in extra:
                        rule["labels"].pop(k)
            if rendered != rules_file["groups"]:
                problems.append(f"{name_of(obj)} differs from deploy/prometheus/rules/syncfleet.rules.yml")
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].endswith("-dashboard"):
            if obj["metadata"]["labels"].get("grafana_dashboard") != "1":
                problems.append(f"{name_of(obj)}: not labelled grafana_dashboard: \"1\"")
            if json.loads(obj["data"]["syncfleet-fleet.json"]) != dashboard_file:
                problems.append(f"{name_of(obj)} differs from deploy/grafana/dashboards/syncfleet-fleet.json")
    return problems


ASSERTIONS = [
    check_pod_security_restricted,
    check_no_replicas_under_autoscaling,
    check_resources,
    check_no_secret_outside_secrets,
    check_labels,
    check_hook_ordering,
    check_workloads,
    check_autoscaler_signals,
    check_monitoring_sources,
]


def check_notes(notes, values):
    worker = values.get("worker") or {}
    scaling = worker.get("autoscaling") or {}
    autoscaled = (scaling.get("keda") or {}).get("enabled") or (scaling.get("hpa") or {}).get("enabled")
    if autoscaled and "replicas (fixed" in notes:
        return ["NOTES.txt states a fixed replica count under autoscaling"]
    return []


# ---------------------------------------------------------------------------------------------
# Schema validation


def validate_core(objects) -> list[str]:
    problems = []
    for obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(strip(obj), KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{obj['__source__']}: {name_of(obj)}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{obj['__source__']}: {e.message}")
    return problems


def validate_crds(batch: list[dict]) -> tuple[int, list[str]]:
    """Runs every custom resource of `batch` through node; returns (count, failure lines)."""
    if not batch:
        return 0, []
    out = subprocess.run(
        ["node", str(ROOT / "deploy/check/validate-crds.mjs"), str(NODE_MODULES)],
        input=json.dumps(batch), capture_output=True, text=True, check=False,
    )
    lines = out.stdout.splitlines()
    failures = [line for line in lines if not line.startswith("ok ")]
    if out.returncode != 0 and not failures:
        failures = [f"node validator failed: {out.stderr.strip()}"]
    if out.returncode == 0 and len(lines) != len(batch):
        failures.append(f"node validator answered {len(lines)} lines for {len(batch)} objects")
    return len(batch), failures


# ---------------------------------------------------------------------------------------------
# Negative cases: each must be rejected, or the check that should catch it is broken.


def base_values():
    return yaml.safe_load((CHART / "ci/minimal-values.yaml").read_text())


def keda_values():
    return yaml.safe_load((CHART / "ci/keda-values.yaml").read_text())


def merged(base, patch):
    out = copy.deepcopy(base)
    for k, v in patch.items():
        out[k] = merged(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# (name, values, expected fragment of the Helm error) — rejected by the schema or a template `fail`.
REJECTED_VALUES = [
    ("typo in a key (worker.replica)", lambda: merged(base_values(), {"worker": {"replica": 3}}), "replica"),
    ("typo at the top level (secret)", lambda: merged(base_values(), {"secret": {}}), "secret"),
    ('wrong type (worker.replicas: "two")', lambda: merged(base_values(), {"worker": {"replicas": "two"}}), "replicas"),
    ("grace period not above the drain deadline",
     lambda: merged(base_values(), {"worker": {"shutdownGraceSecs": 40, "terminationGracePeriodSeconds": 40}}),
     "terminationGracePeriodSeconds"),
    ("KEDA and HPA together",
     lambda: merged(keda_values(), {"worker": {"autoscaling": {"minReplicas": 1, "hpa": {"enabled": True}}}}),
     "mutually exclusive"),
    ("KEDA without the management API URL",
     lambda: merged(base_values(), {"worker": {"autoscaling": {"keda": {"enabled": True}}}}),
     "amqpManagementUrl"),
    ("no database URL", lambda: merged(base_values(), {"secrets": {"databaseUrl": {"value": ""}}}), "databaseUrl"),
    ("an integration without a token", lambda: merged(base_values(), {"integrations": [{"slug": "acme", "token": {}}]}), "token"),
]


def mutate(objects, kind, name_suffix, fn):
    out = copy.deepcopy(objects)
    for obj in out:
        if obj["kind"] == kind and obj["metadata"]["name"].endswith(name_suffix):
            fn(obj)
            return out
    raise CheckFailed(f"negative case: no {kind} *{name_suffix} to mutate")


def worker_pod(obj):
    return obj["spec"]["template"]["spec"]


# (name, values or None for minimal, mutation of the rendered objects or None, assertion that must fail)
CAUGHT_BY_ASSERTIONS = [
    ("a pod without seccompProfile and with privilege escalation",
     lambda: merged(base_values(), {"podSecurityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                                    "securityContext": {"allowPrivilegeEscalation": True, "capabilities": {"drop": ["ALL"]}}}),
     None, check_pod_security_restricted),
    ("an unconfined AppArmor profile",
     lambda: merged(base_values(), {"podSecurityContext": {"appArmorProfile": {"type": "Unconfined"}}}),
     None, check_pod_security_restricted),
    ("a hostPath volume", lambda: merged(base_values(), {"extraVolumes": [{"name": "h", "hostPath": {"path": "/"}}]}),
     None, check_pod_security_restricted),
    # Helm merges values over the defaults; null deletes a default key.
    ("a container without a cpu request or memory limit",
     lambda: merged(base_values(), {"worker": {"resources": {"requests": {"cpu": None}, "limits": {"memory": None}}}}),
     None, check_resources),
    ("replicas on a KEDA-scaled Deployment", keda_values,
     lambda objs: mutate(objs, "Deployment", "-worker", lambda o: o["spec"].__setitem__("replicas", 2)),
     check_no_replicas_under_autoscaling),
    ("a secret value in a ConfigMap", base_values,
     lambda objs: objs + [{"apiVersion": "v1", "kind": "ConfigMap", "__source__": "x",
                           "metadata": {"name": "leak", "labels": objs[0]["metadata"]["labels"]},
                           "data": {"url": base_values()["secrets"]["databaseUrl"]["value"]}}],
     check_no_secret_outside_secrets),
    ("a secret value in plain env",
     lambda: merged(base_values(), {"extraEnv": [{"name": "X", "value": base_values()["secrets"]["redisUrl"]["value"]}]}),
     None, check_no_secret_outside_secrets),
    ("a missing app.kubernetes.io/part-of label", base_values,
     lambda objs: mutate(objs, "Service", "-producer", lambda o: o["metadata"]["labels"].pop("app.kubernetes.io/part-of")),
     check_labels),
    ("a pod label overriding the component", lambda: merged(base_values(), {"podLabels": {"app.kubernetes.io/instance": "other"}}),
     None, check_labels),
    ("the chart Secret as a normal resource", base_values,
     lambda objs: mutate(objs, "Secret", "syncfleet", lambda o: o["metadata"].pop("annotations")),
     check_hook_ordering),
    ("a minAvailable PDB", base_values,
     lambda objs: mutate(objs, "PodDisruptionBudget", "-worker",
                         lambda o: (o["spec"].pop("maxUnavailable"), o["spec"].__setitem__("minAvailable", 1))),
     check_workloads),
    ("a KEDA trigger over AMQP", keda_values,
     lambda objs: mutate(objs, "ScaledObject", "-worker",
                         lambda o: o["spec"]["triggers"][0]["metadata"].__setitem__("protocol", "amqp")),
     check_autoscaler_signals),
    ("a PrometheusRule that drifted from deploy/prometheus",
     lambda: yaml.safe_load((CHART / "ci/monitoring-values.yaml").read_text()),
     lambda objs: mutate(objs, "PrometheusRule", "syncfleet", lambda o: o["spec"]["groups"][0]["rules"].pop()),
     check_monitoring_sources),
]

REJECTED_BY_SCHEMAS = [
    ("a Deployment with an unknown field (core schema, strict)", base_values,
     lambda objs: mutate(objs, "Deployment", "-worker", lambda o: worker_pod(o).__setitem__("terminationGracePeriod", 5)),
     "core"),
    ("a ScaledObject with a string replica count (KEDA CRD schema)", keda_values,
     lambda objs: mutate(objs, "ScaledObject", "-worker", lambda o: o["spec"].__setitem__("maxReplicaCount", "three")),
     "crd"),
    ("a ScaledObject with a misspelled field (CRD types, strict)", keda_values,
     lambda objs: mutate(objs, "ScaledObject", "-worker", lambda o: o["spec"].__setitem__("pollingIntervall", 5)),
     "crd"),
    ("a PrometheusRule rule with an unknown field (CRD types, strict)",
     lambda: yaml.safe_load((CHART / "ci/monitoring-values.yaml").read_text()),
     lambda objs: mutate(objs, "PrometheusRule", "syncfleet",
                         lambda o: o["spec"]["groups"][0]["rules"][0].__setitem__("severity", "page")),
     "crd"),
    ("a PodMonitor endpoint without a list (Prometheus Operator CRD schema)",
     lambda: yaml.safe_load((CHART / "ci/monitoring-values.yaml").read_text()),
     lambda objs: mutate(objs, "PodMonitor", "syncfleet", lambda o: o["spec"].__setitem__("podMetricsEndpoints", {"port": "metrics"})),
     "crd"),
]


def run_negative(chart) -> list[str]:
    problems = []
    for name, values_fn, fragment in REJECTED_VALUES:
        try:
            render(chart, values_fn())
            problems.append(f"not rejected: {name}")
        except Exception as e:  # the SDK raises HelmValuesError / HelmRenderError
            if fragment not in str(e):
                problems.append(f"{name}: rejected, but not for the expected reason: {e}")
            else:
                print(f"  rejected as it must be: {name}: {short(e)}")
    for name, values_fn, mutation, assertion in CAUGHT_BY_ASSERTIONS:
        objects, _ = render(chart, values_fn())
        if mutation:
            objects = mutation(objects)
        found = assertion(objects, values_fn())
        if found:
            print(f"  caught as it must be: {name}: {found[0]}")
        else:
            problems.append(f"{assertion.__name__} did not catch: {name}")
    crd_batch, crd_cases = [], []
    for name, values_fn, mutation, which in REJECTED_BY_SCHEMAS:
        objects = mutation(render(chart, values_fn())[0])
        if which == "core":
            found = validate_core(objects)
            if found:
                print(f"  rejected as it must be: {name}: {found[0]}")
            else:
                problems.append(f"schema validation did not reject: {name}")
        else:
            # One node process for every CRD case; each case is told apart by its source.
            source = f"negative case {len(crd_cases) + 1}"
            crd_cases.append((name, source))
            crd_batch += [{"source": source, "object": strip(o)} for o in objects if o["apiVersion"].startswith(CRD_GROUPS)]
    failures = validate_crds(crd_batch)[1]
    for name, source in crd_cases:
        found = [f for f in failures if f.startswith(f"FAIL {source}:")]
        if found:
            print(f"  rejected as it must be: {name}: {found[0]}")
        else:
            problems.append(f"CRD validation did not reject: {name}")
    return problems


def run_negative_deploy() -> list[str]:
    """The compose and Dockerfile checks reject what they must."""
    problems = []
    config, error = compose_config(ROOT / "deploy/compose.yaml")
    if config is None:
        return [f"docker compose config: {error}"]
    cases = [
        ("a service without a health check", lambda c: c["services"]["redis"].pop("healthcheck")),
        ("a dependency without a health condition",
         lambda c: c["services"]["worker"]["depends_on"]["redis"].__setitem__("condition", "service_started")),
        ("a syncfleet service without the OTLP endpoint",
         lambda c: c["services"]["producer"]["environment"].pop("OTEL_EXPORTER_OTLP_ENDPOINT")),
    ]
    for name, fn in cases:
        broken = copy.deepcopy(config)
        fn(broken)
        found = compose_problems(broken)
        if found:
            print(f"  caught as it must be: compose, {name}: {found[0]}")
        else:
            problems.append(f"compose_problems did not catch: {name}")
    with tempfile.TemporaryDirectory() as tmp:
        bad_compose = pathlib.Path(tmp, "compose.yaml")
        bad_compose.write_text("services:\n  worker:\n    image: x\n    depends_on: {db: {condition: service_healthy}}\n")
        if compose_config(bad_compose)[0] is not None:
            problems.append("docker compose config accepted a dependency on an undefined service")
        else:
            print("  rejected as it must be: compose, a dependency on an undefined service (docker compose config)")
        bad_dockerfile = pathlib.Path(tmp, "Dockerfile")
        bad_dockerfile.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n")
        out = hadolint(bad_dockerfile)
        if out.returncode == 0:
            problems.append("hadolint accepted an unpinned base image and apt-get install")
        else:
            print(f"  rejected as it must be: Dockerfile, unpinned image and packages (hadolint): {out.stdout.splitlines()[0]}")
    return problems


def short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) < 160 else text[:157] + "…"


# ---------------------------------------------------------------------------------------------
# Compose and Dockerfile

SYNCFLEET_SERVICES = ("migrate", "worker", "producer")


def compose_config(compose_file: pathlib.Path) -> tuple[dict | None, str]:
    """`docker compose config` (the real Compose engine: interpolation, anchors, validation)."""
    env = dict(os.environ, SYNCFLEET_ENCRYPTION_KEY="Y2ktZW5jcnlwdGlvbi1rZXktNC0zMi1ieXRlcyEhISE=")
    out = subprocess.run(
        [str(VENV_BIN / "docker-compose"), "-f", str(compose_file), "config", "--format", "json"],
        capture_output=True, text=True, env=env, check=False,
    )
    if out.returncode != 0:
        return None, " ".join(out.stderr.split())
    return json.loads(out.stdout), ""


def check_compose() -> list[str]:
    config, error = compose_config(ROOT / "deploy/compose.yaml")
    return [f"docker compose config: {error}"] if config is None else compose_problems(config)


def compose_problems(config: dict) -> list[str]:
    problems = []
    services = config["services"]
    one_shot = {
        dep for svc in services.values() for dep, cond in (svc.get("depends_on") or {}).items()
        if cond.get("condition") == "service_completed_successfully"
    }
    for name, svc in services.items():
        hc = svc.get("healthcheck") or {}
        if name in one_shot:
            if svc.get("restart") not in (None, "no"):
                problems.append(f"compose {name}: a one-shot service must not restart")
        elif not hc.get("test") or hc.get("disable"):
            problems.append(f"compose {name}: no health check")
        for dep, cond in (svc.get("depends_on") or {}).items():
            wanted = "service_completed_successfully" if dep in one_shot else "service_healthy"
            if cond.get("condition") != wanted:
                problems.append(f"compose {name}: depends_on {dep} with {cond.get('condition')}, not {wanted}")
        if name in SYNCFLEET_SERVICES and not (svc.get("environment") or {}).get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            problems.append(f"compose {name}: no OTEL_EXPORTER_OTLP_ENDPOINT")
    for name in SYNCFLEET_SERVICES:
        if name not in services:
            problems.append(f"compose: no {name} service")
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    worker_jobs = [
        j for j in prometheus["scrape_configs"]
        if any("worker" in (sd.get("names") or []) for sd in j.get("dns_sd_configs") or [])
    ]
    if not worker_jobs:
        problems.append("prometheus.yml: the workers are not scraped through dns_sd_configs (every replica)")
    for job in prometheus["scrape_configs"]:
        for sc in job.get("static_configs") or []:
            if any(t.startswith("worker:") for t in sc.get("targets") or []):
                problems.append("prometheus.yml: a static worker:PORT target scrapes one replica at random")
    return problems


def hadolint(dockerfile: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "hadolint"), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True, text=True, check=False,
    )


def check_dockerfile() -> list[str]:
    problems = []
    out = hadolint(ROOT / "deploy/Dockerfile")
    if out.returncode != 0:
        problems += [f"hadolint: {line}" for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    ignore = (ROOT / ".dockerignore").read_text().split() if (ROOT / ".dockerignore").exists() else []
    for needed in ("target", ".git"):
        if not any(p.strip("/") == needed for p in ignore):
            problems.append(f".dockerignore does not exclude {needed}/")
    return problems


# ---------------------------------------------------------------------------------------------


def main() -> int:
    started = time.monotonic()
    failures: list[str] = []
    passed = 0

    def record(label: str, problems: list[str]):
        nonlocal passed
        if problems:
            failures.extend(f"{label}: {p}" for p in problems)
            print(f"FAIL {label}")
            for p in problems:
                print(f"     {p}")
        else:
            passed += 1

    print(f"check-deploy: Helm SDK {helm.helm_sdk_version()}, Kubernetes schemas {KUBE_VERSION} (strict)")
    crd_batch: list[dict] = []
    with helm_stderr():
        chart = helm.Chart.load(CHART)
    with chart:
        ci_files = sorted((CHART / "ci").glob("*.yaml"))
        if not ci_files:
            record("chart", ["no ci/*.yaml values files"])
        for path in ci_files:
            label = f"chart[{path.name}]"
            values = yaml.safe_load(path.read_text()) or {}
            with helm_stderr():
                lint = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}.0", namespace=NAMESPACE)
            lint_problems = lint.get("errors", []) + [
                f"{m['path']}: {m['error']}" for m in lint.get("messages", []) if m["severity"] >= 2
            ]
            record(f"{label} lint --strict", lint_problems)
            try:
                objects, notes = render(chart, values)
            except Exception as e:
                record(f"{label} render", [short(e)])
                continue
            core = [o for o in objects if not o["apiVersion"].startswith(CRD_GROUPS)]
            record(f"{label} kubernetes schemas", validate_core(objects))
            for assertion in ASSERTIONS:
                record(f"{label} {assertion.__name__}", assertion(objects, values))
            record(f"{label} NOTES.txt", check_notes(notes, values))
            crds = [o for o in objects if o["apiVersion"].startswith(CRD_GROUPS)]
            crd_batch += [{"source": path.name, "object": strip(o)} for o in crds]
            print(
                f"  {path.name}: {len(objects)} manifests rendered; {len(core)} validated against "
                f"Kubernetes {KUBE_VERSION}, {len(crds)} custom resources sent to CRD schemas"
            )
        count, crd_failures = validate_crds(crd_batch)
        record(f"CRD schemas ({count} objects)", crd_failures)
        print("  negative cases:")
        record("negative cases", run_negative(chart))
    record("compose (docker compose config)", check_compose())
    record("negative cases (compose, Dockerfile)", run_negative_deploy())
    record("Dockerfile (hadolint) and .dockerignore", check_dockerfile())

    elapsed = time.monotonic() - started
    status = "FAILED" if failures else "ok"
    print(f"check-deploy: {status}: {passed} checks passed, {len(failures)} failed in {elapsed:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

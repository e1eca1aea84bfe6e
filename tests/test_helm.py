"""The Helm chart, rendered for real (as Airflow's chart tests do): `helm lint --strict` and
`helm template` on every value set in helm/headstart/ci/, each document checked against the
Kubernetes API schemas, and the chart's promises asserted on the documents it renders.

helm comes from PATH or .tools/bin (helm/install-tools.sh puts it there); without it these tests
skip, or fail where HEADSTART_TEST_REQUIRE_SERVERS is set (CI)."""

import functools
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "headstart"
CI_VALUES = sorted(path.name for path in (CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "hs", "headstart"
KUBE_VERSION = "1.31"
# Custom resources: kubernetes_validate knows the built-in kinds only.
CRD_API_GROUPS = ("keda.sh/",)
STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                   "app.kubernetes.io/version", "app.kubernetes.io/component",
                   "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "helm.sh/chart")
ADMIN_KEY, PREDICT_KEY = "admin-key-0123456789", "predict-key-0123456789"


def _find_helm() -> str | None:
    local = ROOT / ".tools" / "bin" / "helm"
    return shutil.which("helm") or (str(local) if os.access(local, os.X_OK) else None)


@pytest.fixture(scope="session")
def helm() -> str:
    if found := _find_helm():
        return found
    reason = "helm is not installed: run helm/install-tools.sh (puts it in .tools/bin)"
    if os.environ.get("HEADSTART_TEST_REQUIRE_SERVERS"):
        pytest.fail(reason)
    pytest.skip(reason)


@functools.cache
def _template(helm: str, chart: Path, values: tuple[str, ...], sets: tuple[str, ...],
              show_only: str | None = None) -> subprocess.CompletedProcess:
    command = [helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE,
               "--kube-version", f"{KUBE_VERSION}.0"]
    for name in values:
        command += ["--values", str(CHART / "ci" / name)]
    for assignment in sets:
        command += ["--set", assignment]
    if show_only:
        command += ["--show-only", show_only]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def render(helm: str, *values: str, set: tuple[str, ...] = ()) -> list[dict]:
    """The documents `helm template` renders with these ci/ value files and --set assignments."""
    result = _template(helm, CHART, values, tuple(set))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(helm: str, *values: str, set: tuple[str, ...] = ()) -> str:
    result = _template(helm, CHART, values, tuple(set))
    assert result.returncode != 0, "rendering should have failed"
    return result.stderr


def find(docs: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind and (
        component is None or doc["metadata"]["labels"]["app.kubernetes.io/component"] == component)]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = find(docs, kind, component)
    assert len(found) == 1, f"{len(found)} {kind} documents for component {component}"
    return found[0]


def pod_spec(docs: list[dict], component: str) -> dict:
    return one(docs, "Deployment", component)["spec"]["template"]["spec"]


def container_of(docs: list[dict], component: str) -> dict:
    """The component's own container (the API pod also runs its proxy)."""
    (container,) = [container for container in pod_spec(docs, component)["containers"]
                    if container["name"] == component]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def config_data(docs: list[dict]) -> dict[str, str]:
    return one(docs, "ConfigMap", "config")["data"]


def secret_data(docs: list[dict]) -> dict[str, str]:
    import base64

    secrets = find(docs, "Secret")
    return {key: base64.b64decode(value).decode()
            for secret in secrets for key, value in secret.get("data", {}).items()}


def ci_values(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / name).read_text())


# ------------------------------------------------------------------ every value set


@pytest.mark.parametrize("values", CI_VALUES)
def test_lint_strict_passes(helm, values):
    result = subprocess.run([helm, "lint", "--strict", str(CHART), "--values",
                             str(CHART / "ci" / values)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", CI_VALUES)
def test_every_document_is_valid_for_the_kubernetes_api(helm, values):
    docs = render(helm, values)
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_API_GROUPS):
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {error}")
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("values", CI_VALUES)
def test_every_object_has_the_standard_labels(helm, values):
    for doc in render(helm, values):
        labels = doc["metadata"]["labels"]
        assert set(STANDARD_LABELS) <= set(labels), (doc["kind"], doc["metadata"]["name"])
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "headstart"
        assert doc["metadata"]["namespace"] == NAMESPACE
        if doc["kind"] == "Deployment":
            pod_labels = doc["spec"]["template"]["metadata"]["labels"]
            assert set(STANDARD_LABELS) <= set(pod_labels)
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= pod_labels.items()
            assert "app.kubernetes.io/version" not in selector  # selectors are immutable


@pytest.mark.parametrize("values", CI_VALUES)
def test_every_container_has_cpu_and_memory_requests_and_limits(helm, values):
    for deployment in find(render(helm, values), "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), (
                    deployment["metadata"]["name"], container["name"], kind)


@pytest.mark.parametrize("values", CI_VALUES)
def test_every_pod_runs_as_non_root_on_a_read_only_root_filesystem(helm, values):
    for deployment in find(render(helm, values), "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        name = deployment["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] > 0, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert context.get("privileged", False) is False, name
            tmp = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp"]
            assert len(tmp) == 1, f"{name}: no /tmp mount"
            assert volumes[tmp[0]["name"]]["emptyDir"]["sizeLimit"], name


@pytest.mark.parametrize("values", CI_VALUES)
def test_headstart_pods_run_as_the_image_user(helm, values):
    docs = render(helm, values)
    for component in ("api", "worker"):
        spec = pod_spec(docs, component)
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["securityContext"]["runAsGroup"] == 10001
        assert spec["securityContext"]["fsGroup"] == 10001
        assert spec["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]


def test_the_service_account_mounts_no_token(helm):
    account = one(render(helm, "default-values.yaml"), "ServiceAccount")
    assert account["automountServiceAccountToken"] is False


# ------------------------------------------------------------------ the API


def test_api_runs_the_image_api_command_with_its_probes(helm):
    docs = render(helm, "default-values.yaml")
    container = container_of(docs, "api")
    assert container["image"] == "ghcr.io/headstart/headstart:0.1.0"
    assert container["args"] == ["api"]
    assert container["ports"] == [{"name": "app", "containerPort": 8000, "protocol": "TCP"}]
    assert env_of(container)["PORT"] == "8000"
    # The kubelet probes gunicorn itself, not through the proxy.
    probes = {kind: container[f"{kind}Probe"]["httpGet"] for kind in ("startup", "liveness",
                                                                      "readiness")}
    assert probes == {"startup": {"path": "/startupz", "port": "app"},
                      "liveness": {"path": "/healthz", "port": "app"},
                      "readiness": {"path": "/readyz", "port": "app"}}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # the backbone loads
    annotations = one(docs, "Deployment", "api")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"
    service = one(docs, "Service", "api")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == one(docs, "Deployment", "api")["spec"]["selector"][
        "matchLabels"]


def test_settings_reach_the_pods_through_the_config_map(helm):
    docs = render(helm, "gpu-values.yaml")
    config = config_data(docs)
    assert config["HEADSTART_STORE"] == "s3://headstart/ci"
    assert config["HEADSTART_S3_ENDPOINT_URL"] == "http://minio.storage.svc:9000"
    assert config["HEADSTART_S3_REGION"] == "us-east-1"
    assert config["HEADSTART_S3_ADDRESSING_STYLE"] == "path"
    assert config["HEADSTART_IMAGE_SIZE"] == "224"
    # The image's baked-in weights apply unless backbone.weights says otherwise.
    assert "HEADSTART_BACKBONE_WEIGHTS" not in config
    for component in ("api", "worker"):
        container = container_of(docs, component)
        assert {"configMapRef": {"name": "hs-headstart"}} in container["envFrom"]
        assert {"secretRef": {"name": "hs-headstart"}} in container["envFrom"]
        assert "HEADSTART_BACKBONE_WEIGHTS" not in env_of(container)
    secrets = secret_data(docs)
    assert secrets["HEADSTART_S3_ACCESS_KEY_ID"] == "headstart"
    assert secrets["HEADSTART_S3_SECRET_ACCESS_KEY"] == "headstart-ci-secret"
    assert not any(key.startswith("HEADSTART_S3_") and "KEY" in key for key in config)

    weights = render(helm, "default-values.yaml", set=("backbone.weights=s3://models/vgg16.h5",))
    assert config_data(weights)["HEADSTART_BACKBONE_WEIGHTS"] == "s3://models/vgg16.h5"


@pytest.mark.parametrize("values", CI_VALUES)
def test_every_variable_the_chart_sets_is_one_the_service_reads(helm, values):
    """Chart and application cannot drift apart: a renamed setting fails here."""
    from service.config import Settings

    read_by_gunicorn = {"HEADSTART_WEB_THREADS", "HEADSTART_WEB_WORKERS", "HEADSTART_LOG_LEVEL"}
    known = {f"HEADSTART_{name.upper()}" for name in Settings.model_fields} | read_by_gunicorn
    docs = render(helm, values)
    names = set(config_data(docs)) | set(secret_data(docs))
    for component in ("api", "worker"):
        names |= set(env_of(container_of(docs, component)))
    assert {name for name in names if name.startswith("HEADSTART_")} - known == set()
    assert "HEADSTART_JOB_TIME_LIMIT_S" in config_data(docs)


def test_api_keys_are_kept_in_the_secret_as_key_scope_pairs(helm):
    docs = render(helm, "default-values.yaml", set=(
        f"apiKeys[0].key={ADMIN_KEY}", "apiKeys[0].scope=admin",
        f"apiKeys[1].key={PREDICT_KEY}", "apiKeys[1].scope=predict"))
    assert secret_data(docs)["HEADSTART_API_KEYS"] == f"{ADMIN_KEY}:admin,{PREDICT_KEY}:predict"
    assert "HEADSTART_API_KEYS" not in config_data(docs)
    error = render_error(helm, "default-values.yaml", set=(
        f"apiKeys[0].key={ADMIN_KEY}", "apiKeys[0].scope=owner"))
    assert "apiKeys.0.scope" in error
    error = render_error(helm, "default-values.yaml", set=(
        "apiKeys[0].key=short", "apiKeys[0].scope=admin"))
    assert "apiKeys.0.key" in error


def test_production_values_spread_scale_and_expose_the_api(helm):
    docs = render(helm, "production-values.yaml")
    deployment = one(docs, "Deployment", "api")
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    spec = deployment["spec"]["template"]["spec"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    (term,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term == {"labelSelector": {"matchLabels": selector},
                    "topologyKey": "kubernetes.io/hostname"}
    (spread,) = spec["topologySpreadConstraints"]
    assert spread["labelSelector"] == {"matchLabels": selector}
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spec["priorityClassName"] == "headstart-serving"
    assert spec["imagePullSecrets"] == [{"name": "acme-registry"}]
    container = container_of(docs, "api")
    assert container["image"] == "registry.acme.example/ml/headstart:0.1.0"
    assert env_of(container)["HEADSTART_HEAD_CACHE_SIZE"] == "512"
    assert deployment["spec"]["template"]["metadata"]["annotations"]["team"] == "ml-platform"

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    budget = one(docs, "PodDisruptionBudget", "api")
    assert budget["spec"] == {"minAvailable": 2, "selector": {"matchLabels": selector}}

    ingress = one(docs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "headstart-tls",
                                       "hosts": ["headstart.acme.example"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "headstart.acme.example"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": one(docs, "Service", "api")["metadata"]["name"],
                       "port": {"name": "http"}}
    assert ingress["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-body-size"] == "512m"

    account = one(docs, "ServiceAccount")
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/headstart"}


def test_optional_api_objects_are_off_by_default(helm):
    docs = render(helm, "default-values.yaml")
    for kind in ("Ingress", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ScaledObject"):
        assert not find(docs, kind), kind
    assert one(docs, "Deployment", "api")["spec"]["replicas"] == 1
    assert "affinity" not in pod_spec(docs, "api")


def test_soft_anti_affinity_is_preferred_not_required(helm):
    spec = pod_spec(render(helm, "default-values.yaml", set=("api.podAntiAffinity=soft",)),
                    "api")
    (preferred,) = spec["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_a_disruption_budget_takes_exactly_one_bound(helm):
    error = render_error(helm, "default-values.yaml", set=(
        "api.podDisruptionBudget.enabled=true", "api.podDisruptionBudget.maxUnavailable=1"))
    assert "exactly one of minAvailable and maxUnavailable" in error


# ------------------------------------------------------------------ the workers


def test_workers_run_on_gpu_nodes_from_the_values(helm):
    values = ci_values("gpu-values.yaml")["worker"]
    docs = render(helm, "gpu-values.yaml")
    spec = pod_spec(docs, "worker")
    (container,) = spec["containers"]
    assert container["image"] == "ghcr.io/headstart/headstart:0.1.0-gpu"
    assert container["args"] == ["worker"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["memory"] == "24Gi"
    assert spec["nodeSelector"] == values["nodeSelector"]
    assert spec["tolerations"] == values["tolerations"]
    assert spec["affinity"] == values["affinity"]
    assert spec["priorityClassName"] == "headstart-training"
    assert spec["terminationGracePeriodSeconds"] == 7200


def test_workers_shut_down_warm_and_are_probed_on_their_metrics_port(helm):
    docs = render(helm, "default-values.yaml")
    spec = pod_spec(docs, "worker")
    assert spec["terminationGracePeriodSeconds"] == 3600
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["memory"] == "16Gi"
    assert container["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
    assert env_of(container)["HEADSTART_WORKER_METRICS_PORT"] == "9100"
    assert container["startupProbe"]["tcpSocket"] == {"port": "metrics"}
    assert container["livenessProbe"]["tcpSocket"] == {"port": "metrics"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert "readinessProbe" not in container and "httpGet" not in str(container)
    annotations = one(docs, "Deployment", "worker")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9100"
    assert not find(docs, "Service", "worker")


@pytest.mark.parametrize("values", CI_VALUES)
def test_worker_grace_period_allows_a_warm_shutdown(helm, values):
    assert pod_spec(render(helm, values), "worker")["terminationGracePeriodSeconds"] >= 600


def test_cpu_workers_request_no_gpu(helm):
    spec = pod_spec(render(helm, "default-values.yaml", set=(
        "worker.gpu.count=0", "worker.image.tag=0.1.0")), "worker")
    (container,) = spec["containers"]
    assert container["image"].endswith(":0.1.0")
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_keda_scales_workers_on_the_celery_queue_only_when_enabled(helm):
    plain = render(helm, "default-values.yaml")
    assert not find(plain, "ScaledObject")
    assert one(plain, "Deployment", "worker")["spec"]["replicas"] == 1

    docs = render(helm, "gpu-values.yaml")
    deployment = one(docs, "Deployment", "worker")
    assert "replicas" not in deployment["spec"]  # KEDA owns it
    scaled = one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {"name": deployment["metadata"]["name"]}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 8)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    redis_service = one(docs, "Service", "redis")["metadata"]["name"]
    assert trigger["metadata"] == {
        "address": f"{redis_service}.{NAMESPACE}.svc:6379", "listName": "headstart.training",
        "listLength": "1", "databaseIndex": "0", "enableTLS": "false"}
    assert all(isinstance(value, str) for value in trigger["metadata"].values())


def test_keda_reads_an_external_broker_from_its_url(helm):
    docs = render(helm, "production-values.yaml", set=("worker.keda.enabled=true",))
    (trigger,) = one(docs, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["address"] == "headstart-broker.abc123.euw1.cache.amazonaws.com:6379"
    assert trigger["metadata"]["databaseIndex"] == "2"
    assert trigger["metadata"]["enableTLS"] == "true"
    assert "replicas" not in one(docs, "Deployment", "worker")["spec"]

    error = render_error(helm, "production-values.yaml", set=(
        "worker.keda.enabled=true", "broker.url=redis://:hunter2@redis.infra:6379/0"))
    assert "worker.keda.authenticationRef" in error
    with_auth = render(helm, "production-values.yaml", set=(
        "worker.keda.enabled=true", "broker.url=redis://:hunter2@redis.infra/0",
        "worker.keda.authenticationRef=headstart-broker"))
    (trigger,) = one(with_auth, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["address"] == "redis.infra:6379"
    assert trigger["authenticationRef"] == {"name": "headstart-broker"}
    assert "hunter2" not in str(trigger)

    in_secret_only = ("worker.keda.enabled=true", "broker.url=", "broker.redis.enabled=false")
    assert "worker.keda.redis.address is required" in render_error(
        helm, "production-values.yaml", set=in_secret_only)
    docs = render(helm, "production-values.yaml", set=(
        *in_secret_only, "worker.keda.redis.address=redis.infra:6380"))
    (trigger,) = one(docs, "ScaledObject")["spec"]["triggers"]
    assert (trigger["metadata"]["address"], trigger["metadata"]["databaseIndex"]) == (
        "redis.infra:6380", "0")


# ------------------------------------------------------------------ config and secret


@pytest.mark.parametrize("change, rolled, components", [
    ("jobs.leaseSeconds=60", "checksum/config", ("api", "worker")),
    ("store.region=eu-central-1", "checksum/config", ("api", "worker")),
    ("broker.url=redis://broker.infra:6379/1", "checksum/secret", ("api", "worker")),
    (f"apiKeys[0].key={ADMIN_KEY},apiKeys[0].scope=admin", "checksum/secret", ("api", "worker")),
    ("api.proxy.idleTimeoutSeconds=60", "checksum/proxy", ("api",)),
])
def test_a_config_or_secret_change_rolls_the_pods(helm, change, rolled, components):
    def checksums(docs):
        return {component: {key: value for key, value in one(docs, "Deployment", component)[
                    "spec"]["template"]["metadata"]["annotations"].items()
                    if key.startswith("checksum/")}
                for component in ("api", "worker")}

    before = checksums(render(helm, "default-values.yaml"))
    after = checksums(render(helm, "default-values.yaml", set=(change,)))
    assert set(before["api"]) == {"checksum/config", "checksum/secret", "checksum/proxy"}
    assert set(before["worker"]) == {"checksum/config", "checksum/secret"}
    for component in ("api", "worker"):
        changed = {key for key in before[component] if before[component][key] !=
                   after[component][key]}
        assert changed == ({rolled} if component in components else set()), component


def test_the_broker_url_is_a_secret_not_config(helm):
    docs = render(helm, "default-values.yaml", set=("broker.url=redis://:pw@broker:6379/0",))
    assert secret_data(docs)["HEADSTART_QUEUE"] == "redis://:pw@broker:6379/0"
    assert "pw@" not in str(find(docs, "ConfigMap")) + str(find(docs, "Deployment"))


def test_an_existing_secret_is_loaded_after_the_charts_own(helm):
    docs = render(helm, "production-values.yaml")
    for component in ("api", "worker"):
        container = container_of(docs, component)
        assert container["envFrom"][-1] == {"secretRef": {"name": "headstart-credentials"}}
    # The chart's Secret then holds only what the values give: the broker URL.
    assert set(secret_data(docs)) == {"HEADSTART_QUEUE"}

    only_existing = render(helm, "production-values.yaml", set=(
        "broker.url=", "broker.redis.enabled=false"))
    assert not find(only_existing, "Secret")
    container = container_of(only_existing, "api")
    assert container["envFrom"] == [{"configMapRef": {"name": "hs-headstart"}},
                                    {"secretRef": {"name": "headstart-credentials"}}]

    error = render_error(helm, "production-values.yaml", set=("store.accessKeyId=a",
                                                               "store.secretAccessKey=b"))
    assert "existingSecret" in error


def test_the_in_chart_redis_is_rendered_only_without_a_broker_url(helm):
    docs = render(helm, "default-values.yaml")
    redis = one(docs, "Deployment", "redis")
    service = one(docs, "Service", "redis")
    assert service["metadata"]["name"] == "hs-headstart-redis"
    assert secret_data(docs)["HEADSTART_QUEUE"] == "redis://hs-headstart-redis:6379/0"
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "redis:7.4-alpine"
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 999
    assert "--appendonly" in container["args"]
    assert container["args"][container["args"].index("--appendonly") + 1] == "yes"
    assert container["args"][container["args"].index("--maxmemory-policy") + 1] == "noeviction"
    data = next(volume for volume in redis["spec"]["template"]["spec"]["volumes"]
                if volume["name"] == "data")
    assert "emptyDir" in data

    for external in (render(helm, "production-values.yaml"),
                     render(helm, "default-values.yaml", set=("broker.url=redis://r:6379/0",))):
        assert not find(external, "Deployment", "redis")
        assert not find(external, "Service", "redis")

    error = render_error(helm, "default-values.yaml", set=("broker.redis.enabled=false",))
    assert "No broker" in error


def test_the_in_chart_redis_can_keep_its_data_on_a_volume_claim(helm):
    docs = render(helm, "gpu-values.yaml")
    claim = one(docs, "PersistentVolumeClaim", "redis")
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    volumes = pod_spec(docs, "redis")["volumes"]
    data = next(volume for volume in volumes if volume["name"] == "data")
    assert data == {"name": "data",
                    "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}


# ------------------------------------------------------------------ what the chart refuses


def test_the_store_url_is_required(helm):
    result = _template(helm, CHART, (), ())
    assert result.returncode != 0
    assert "store.url is required" in result.stderr


@pytest.mark.parametrize("assignment, message", [
    ("api.replica=2", "Additional property replica is not allowed"),
    ("stor.url=s3://b/p", "Additional property stor is not allowed"),
    ("store.url=my-bucket", "store.url"),
    ("store.addressingStyle=paths", "store.addressingStyle"),
    ("api.podAntiAffinity=always", "api.podAntiAffinity"),
    ("worker.gpu.count=-1", "worker.gpu.count"),
])
def test_the_schema_catches_typos_and_bad_values(helm, assignment, message):
    assert message in render_error(helm, "default-values.yaml", set=(assignment,))


# ------------------------------------------------------------------ NOTES.txt


@pytest.fixture(scope="session")
def notes_chart(tmp_path_factory) -> Path:
    """A copy of the chart that renders NOTES.txt as a document: `helm template` leaves NOTES out,
    and `helm install --dry-run` needs a cluster."""
    chart = tmp_path_factory.mktemp("chart") / "headstart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "zz-notes.yaml").write_text(
        '{{- define "test.notes" }}' + notes + '{{- end }}\n'
        'notes: {{ include "test.notes" . | toJson }}\n')
    return chart


def notes(helm: str, chart: Path, *values: str, set: tuple[str, ...] = ()) -> str:
    result = _template(helm, chart, values, tuple(set), show_only="templates/zz-notes.yaml")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["notes"]


def test_notes_tell_how_to_reach_the_api_and_warn_about_the_in_chart_broker(helm, notes_chart):
    text = notes(helm, notes_chart, "default-values.yaml")
    assert f"kubectl --namespace {NAMESPACE} port-forward service/hs-headstart-api 8000:80" in text
    assert "WARNING: the broker is the in-chart Redis" in text
    assert "no S3 credentials" in text and "no API keys" in text

    text = notes(helm, notes_chart, "production-values.yaml")
    assert "export HEADSTART_URL=https://headstart.acme.example\n" in text
    assert "port-forward" not in text and "in-chart Redis" not in text
    assert "headstart-credentials" in text and "proxy-body-size" in text

    text = notes(helm, notes_chart, "gpu-values.yaml", set=("api.service.type=LoadBalancer",))
    assert "load balancer" in text and ".status.loadBalancer.ingress[0]" in text
    assert "scaled by KEDA" in text


# ------------------------------------------------------------------ the API's buffering proxy


def proxy_config(docs: list[dict]) -> str:
    return one(docs, "ConfigMap", "api")["data"]["nginx.conf"]


def test_the_api_is_served_through_its_buffering_proxy(helm):
    docs = render(helm, "default-values.yaml")
    spec = pod_spec(docs, "api")
    proxy = next(container for container in spec["containers"] if container["name"] == "proxy")
    assert proxy["image"].startswith("nginxinc/nginx-unprivileged:")
    assert proxy["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert proxy["command"][0] == "nginx"
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/proxyz", "port": "http"}
    mounts = {mount["mountPath"]: mount["name"] for mount in proxy["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes[mounts["/etc/headstart-proxy"]]["configMap"]["name"] == "hs-headstart-api-proxy"
    assert volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"] == "4Gi"
    assert mounts["/tmp"] != next(mount["name"] for mount in container_of(docs, "api")[
        "volumeMounts"] if mount["mountPath"] == "/tmp")
    # The Service's "http" is now nginx's port; nginx passes to gunicorn on the pod's loopback.
    assert one(docs, "Service", "api")["spec"]["ports"][0]["targetPort"] == "http"
    config = proxy_config(docs)
    for directive in ("server 127.0.0.1:8000;", "listen 8080;", "client_max_body_size 536870912;",
                      "client_header_timeout 10s;", "client_body_timeout 30s;",
                      "send_timeout 30s;", "proxy_request_buffering on;", "proxy_buffering on;",
                      "pid /tmp/nginx.pid;"):
        assert directive in config, directive
    assert "limit_conn " not in config  # behind an ingress, every client has its address
    limited = proxy_config(render(helm, "default-values.yaml", set=(
        "api.proxy.connectionsPerClient=16",)))
    assert "limit_conn per_client 16;" in limited


def test_without_the_proxy_the_service_reaches_gunicorn(helm):
    docs = render(helm, "default-values.yaml", set=("api.proxy.enabled=false",))
    (container,) = pod_spec(docs, "api")["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert not find(docs, "ConfigMap", "api")
    annotations = one(docs, "Deployment", "api")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/proxy" not in annotations


def _nginx() -> str:
    if found := shutil.which("nginx") or next(
            (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
             if os.access(path, os.X_OK)), None):
        return found
    reason = "nginx is not installed (apt-get install nginx): the proxy's config is not run"
    if os.environ.get("HEADSTART_TEST_REQUIRE_SERVERS"):
        pytest.fail(reason)
    pytest.skip(reason)


def runnable_proxy_config(helm: str, tmp: Path, *sets: str) -> Path:
    """The chart's nginx.conf, with everything it writes under `tmp` instead of /tmp."""
    config = proxy_config(render(helm, "default-values.yaml", set=sets))
    path = tmp / "nginx.conf"
    path.write_text(config.replace(" /tmp/", f" {tmp}/"))
    return path


def test_the_proxy_config_is_valid_nginx(helm, tmp_path):
    nginx = _nginx()
    config = runnable_proxy_config(helm, tmp_path, "api.proxy.connectionsPerClient=16")

    result = subprocess.run([nginx, "-t", "-e", "stderr", "-c", str(config)], capture_output=True,
                            text=True, timeout=30)

    assert result.returncode == 0, result.stderr


def test_the_proxy_buffers_slow_clients_in_front_of_a_real_gunicorn(helm, tmp_path):
    from tests.helpers import call, gunicorn_server, multipart
    from tests.test_hostile import Trickle, four_images, zip_of
    from tools.localservers import free_port

    nginx = _nginx()
    with gunicorn_server(tmp_path / "api", HEADSTART_WEB_THREADS="2") as (base, _, _):
        proxy_port = free_port()
        config = runnable_proxy_config(
            helm, tmp_path, f"api.port={base.rsplit(':', 1)[1]}", f"api.proxy.port={proxy_port}",
            "api.proxy.headerTimeoutSeconds=2", "api.maxUploadBytes=1000000")
        log = open(tmp_path / "nginx.log", "wb")
        proxy = subprocess.Popen([nginx, "-e", "stderr", "-c", str(config)], stdout=log,
                                 stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{proxy_port}"
        slow = []
        try:
            deadline = time.monotonic() + 10
            while call_status(url + "/proxyz") != 200:
                assert proxy.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "nginx.log").read_text()
                time.sleep(0.1)
            # Twenty slowloris clients for a gunicorn of two threads, and two stalled bodies.
            for _ in range(20):
                slow.append(Trickle(socket.create_connection(("127.0.0.1", proxy_port)),
                                    b"GET /v1/classifiers HTTP/1.1\r\nHost: x\r\nX-Slow: "))
            for _ in range(2):
                slow.append(Trickle(socket.create_connection(("127.0.0.1", proxy_port)),
                                    b"POST /v1/classifiers HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: 900000\r\n\r\n", every_s=60))
            for client in slow:
                client.start()
            time.sleep(0.5)

            started = time.monotonic()
            listed = call("GET", url + "/v1/classifiers", timeout=10)[0]
            listed_s = time.monotonic() - started
            body, content_type = multipart({
                "dataset": [("d.zip", zip_of(four_images()).getvalue())],
                "options": '{"max_epochs": 1, "augmentation": {"views": 0}}'})
            created = call("POST", url + "/v1/classifiers", body, content_type, timeout=30)
            too_large = call("POST", url + "/v1/classifiers", bytes(1_000_001),
                             "application/octet-stream", timeout=30)
        finally:
            for client in slow:
                client.stop.set()
                client.sock.close()
            proxy.terminate()
            proxy.wait(timeout=10)
            log.close()

    assert listed == 200 and listed_s < 1, listed_s
    assert created[0] == 202, created
    assert too_large[0] == 413 and too_large[1]["Content-Type"] == "application/problem+json"
    assert "limit of 1000000 bytes" in too_large[2]["detail"]


def call_status(url: str) -> int | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except OSError:
        return None

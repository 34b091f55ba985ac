"""The KubeRay manifests in k8s/, checked without a cluster.

Structure against KubeRay's CRD schemas (../shared/schemas/), `serveConfigV2` against Ray's
`ServeDeploySchema` and the application's own config model, the operator's rules that live in
code, and the invariants of the deployment: GPUs agree with worker counts and node sizes, images
and Ray versions pinned and equal to the installed Ray, ports exposed, volumes in place, and the
committed files equal to what `k8s/render.py` renders.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from pydantic import BaseModel
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

import model.synthetic
from engine.kv_sizing import max_sequence_tokens
from k8s import render as k8s_render
from model.config import ModelConfig
from serving.app import ServeAppConfig, replica_resources
from sim.models import model_config

REPO = Path(__file__).parents[2]
K8S = REPO / "k8s"
SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
SERVICES = sorted(p.name for p in K8S.glob("*.yaml") if "kind: RayService" in p.read_text())
GPU_SERVICES = [name for name in SERVICES if re.search(r"\d+x\d+gpu", name)]
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Model facts from the design: routed experts, MoE layers, GB per expert in bf16; H100 memory.
MODELS = {"scout": (16, 48, 0.252), "maverick": (128, 24, 0.252)}
H100_GB = 80


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all((K8S / name).read_text(), Loader=LOADER) if doc]


def service(name: str) -> dict[str, Any]:
    (doc,) = load(name)
    return doc


def serve_config(name: str) -> dict[str, Any]:
    return yaml.safe_load(service(name)["spec"]["serveConfigV2"])


def app_config(name: str) -> ServeAppConfig:
    (app,) = serve_config(name)["applications"]
    return ServeAppConfig.model_validate(app["args"])


def cluster_spec(name: str) -> dict[str, Any]:
    return service(name)["spec"]["rayClusterConfig"]


def pod_specs(name: str) -> list[dict[str, Any]]:
    spec = cluster_spec(name)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def ray_container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["containers"][0]  # KubeRay's Ray container is the first


def ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def gpu_group(name: str) -> dict[str, Any]:
    (group,) = cluster_spec(name)["workerGroupSpecs"]
    return group


# -- the files ------------------------------------------------------------------------------


def test_the_three_sizes_are_there() -> None:
    assert SERVICES == ["cpu-demo.yaml", "maverick-2x8gpu.yaml", "scout-1x8gpu.yaml"]


def test_committed_manifests_equal_the_render_output() -> None:
    assert k8s_render.stale() == [], "run `python -m k8s.render` and commit k8s/"


def test_check_mode_reports_stale_missing_and_extra_files(tmp_path: Path) -> None:
    assert k8s_render.main(["--check", "--out", str(tmp_path)]) == 1  # everything missing
    k8s_render.write(tmp_path)
    assert k8s_render.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "cpu-demo.yaml").write_text((tmp_path / "cpu-demo.yaml").read_text() + "# edited\n")
    (tmp_path / "stray.yaml").write_text("kind: ConfigMap\n")
    problems = k8s_render.stale(tmp_path)
    assert [p.split(":")[0] for p in problems] == ["cpu-demo.yaml", "stray.yaml"]


# -- structure: the CRD schema and the operator's own rules --------------------------------


@pytest.fixture(scope="module")
def rayservice_schema() -> dict[str, Any]:
    path = SCHEMAS / "ray.io_rayservices.yaml"
    if not path.exists():
        pytest.skip(
            f"KubeRay CRD schemas not found at {SCHEMAS} (they sit beside the repository, in "
            "../shared/schemas/kuberay/); CRD validation skipped"
        )
    crd = yaml.load(path.read_text(), Loader=LOADER)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys the schema does not declare: the API server would drop them silently (pruning),
    and plain JSON Schema does not flag them because CRDs leave additionalProperties open."""
    if isinstance(value, list) and "items" in schema:
        return [f for i, v in enumerate(value) for f in unknown_fields(v, schema["items"], f"{path}[{i}]")]
    if not isinstance(value, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    found = []
    for key, v in value.items():
        if props is not None and key in props:
            found += unknown_fields(v, props[key], f"{path}.{key}")
        elif isinstance(extra, dict):
            found += unknown_fields(v, extra, f"{path}.{key}")
        elif props is not None:
            found.append(f"{path}.{key}")
    return found


@pytest.mark.parametrize("name", SERVICES)
def test_manifest_matches_the_rayservice_crd(name: str, rayservice_schema: dict[str, Any]) -> None:
    doc = service(name)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(rayservice_schema).iter_errors(doc)
    ]
    assert errors == []
    assert unknown_fields(doc, rayservice_schema) == []
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")


@pytest.mark.parametrize("name", SERVICES)
def test_manifest_keeps_the_operators_rules(name: str) -> None:
    """What KubeRay checks in code (ray-operator/controllers/ray/utils/validation.go)."""
    spec = service(name)["spec"]
    assert spec["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
    cluster = spec["rayClusterConfig"]
    assert "headService" not in cluster["headGroupSpec"]
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert all(pod["containers"] for pod in pod_specs(name))


# -- serveConfigV2 --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_serve_config_passes_rays_schema(name: str) -> None:
    config = serve_config(name)
    ServeDeploySchema.model_validate(config)
    # Serve's schema accepts unknown keys (forward compatibility), so a typo would pass silently
    assert set(config) <= set(ServeDeploySchema.model_fields)
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields)


@pytest.mark.parametrize("name", SERVICES)
def test_import_path_imports_and_its_arguments_pass_the_apps_model(name: str) -> None:
    (app,) = serve_config(name)["applications"]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    # what Serve does before calling a builder: validate `args` into its annotated model
    (param,) = inspect.signature(builder).parameters.values()
    assert inspect.isclass(param.annotation) and issubclass(param.annotation, BaseModel)
    assert param.annotation is ServeAppConfig
    param.annotation.model_validate(app["args"])


@pytest.mark.parametrize("name", SERVICES)
def test_serve_autoscales_the_engine_and_ray_autoscales_the_pods(name: str) -> None:
    scaling = app_config(name).autoscaling
    assert scaling.max_replicas > scaling.min_replicas  # Serve autoscaling, not a fixed count
    assert cluster_spec(name)["enableInTreeAutoscaling"] is True
    group = cluster_spec(name)["workerGroupSpecs"][0]
    assert group["maxReplicas"] > group["minReplicas"]


# -- GPUs, workers and nodes ----------------------------------------------------------------


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpus_agree_with_workers_per_replica_and_node_size(name: str) -> None:
    nodes, gpus_per_node = map(int, re.search(r"(\d+)x(\d+)gpu", name).groups())
    cfg = app_config(name)
    group = gpu_group(name)
    limits = ray_container(group["template"]["spec"])["resources"]["limits"]
    requests = ray_container(group["template"]["spec"])["resources"]["requests"]
    assert cfg.device == "cuda"
    assert int(limits["nvidia.com/gpu"]) == int(requests["nvidia.com/gpu"]) == gpus_per_node
    assert cfg.cluster_config().num_workers == nodes * gpus_per_node  # one GPU per worker, none idle
    assert group["minReplicas"] == nodes * cfg.autoscaling.min_replicas
    assert group["maxReplicas"] == nodes * cfg.autoscaling.max_replicas
    assert group["rayStartParams"].get("num-gpus", str(gpus_per_node)) == str(gpus_per_node)
    head = cluster_spec(name)["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["num-cpus"] == "0"  # no engine work on the head


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_the_projects_bundles_fit_the_pods_at_full_scale(name: str) -> None:
    cfg = app_config(name)
    group = gpu_group(name)
    pod = ray_container(group["template"]["spec"])["resources"]["limits"]
    cpus, gpus = int(pod["cpu"]), int(pod["nvidia.com/gpu"])
    options = replica_resources(cfg, cpus * group["maxReplicas"], gpus * group["maxReplicas"])
    gpu_bundles = [b for b in options["placement_group_bundles"] if b.get("GPU")]
    assert len(gpu_bundles) == cfg.cluster_config().num_workers
    assert all(b["GPU"] == 1 for b in gpu_bundles)
    assert sum(b["CPU"] for b in options["placement_group_bundles"]) <= cpus * len(gpu_bundles) / gpus


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_expert_workers_span_every_node_of_a_replica(name: str) -> None:
    """More expert workers than the other nodes have GPUs: every node holds some (pigeonhole)."""
    nodes, gpus_per_node = map(int, re.search(r"(\d+)x(\d+)gpu", name).groups())
    assert app_config(name).expert_workers > gpus_per_node * (nodes - 1)


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_expert_slots_fit_an_h100(name: str) -> None:
    experts, moe_layers, gb_per_expert = MODELS[name.split("-")[0]]
    cfg = app_config(name)
    slots = math.ceil(experts / cfg.expert_workers)
    assert slots * moe_layers * gb_per_expert < 0.9 * H100_GB
    assert cfg.engine.dtype in ("bfloat16", "bf16")


def _served_model(name: str) -> ModelConfig:
    """The shape behind a manifest's checkpoint: Llama-4-Scout-... is scout, tiny-maverick-seed0
    its preset."""
    stem = Path(app_config(name).model).name
    if stem.startswith("Llama-4-"):
        return model_config(stem.split("-")[2].lower())
    return model_config(stem.rsplit("-seed", 1)[0])


def _non_expert_bytes(cfg: ModelConfig) -> int:
    """bf16 bytes of what an attention worker holds, counted from the config (norms included)."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    params = 2 * cfg.vocab_size * h + h
    for i in range(cfg.num_hidden_layers):
        params += 2 * h * q + 2 * h * kv + 2 * h
        params += 3 * h * cfg.intermediate_size + cfg.num_local_experts * h if cfg.is_moe(i) else 0
        params += 0 if cfg.is_moe(i) else 3 * h * cfg.intermediate_size_mlp
    return 2 * params


@pytest.mark.parametrize("name", SERVICES)
def test_kv_holds_the_advertised_context_or_the_manifest_says_what_it_holds(name: str) -> None:
    """Per attention worker: GPU sizes take the KV cache from the memory the weights leave on an
    H100 (kv_cache_memory); the longest sequence that fits must reach the model's context, or the
    manifest's header says how many tokens it holds (within 0.1% of this estimate)."""
    cfg, engine = _served_model(name), app_config(name).engine
    if name in GPU_SERVICES:
        assert engine.kv_cache_memory is not None and 0 < engine.kv_cache_memory <= 1
        free = (H100_GB - 1) * 1e9 - _non_expert_bytes(cfg)
        per_block = engine.block_size * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
        num_blocks = int(engine.kv_cache_memory * free) // per_block
    else:
        assert engine.kv_cache_memory is None
        num_blocks = engine.num_kv_blocks
    chunked = [cfg.is_chunked(i) for i in range(cfg.num_hidden_layers)]
    context = cfg.max_position_embeddings
    longest = max_sequence_tokens(
        num_blocks, engine.block_size, chunked, cfg.attention_chunk_size, engine.token_budget, context
    )
    if longest >= context:
        return
    header = " ".join(
        line.removeprefix("# ") for line in (K8S / name).read_text().splitlines() if line[:1] == "#"
    )
    said = re.search(r"one sequence of up to ([\d,]+) tokens", header)
    assert said, f"{name}: its KV holds {longest} of the model's {context} tokens and it does not say so"
    assert abs(int(said.group(1).replace(",", "")) - longest) <= longest / 1000
    assert f"not the model's {context:,}" in header


def test_cpu_demo_uses_no_gpu_and_deploys_with_only_the_head_up() -> None:
    cfg = app_config("cpu-demo.yaml")
    assert cfg.device == "cpu"
    for pod in pod_specs("cpu-demo.yaml"):
        assert "nvidia.com/gpu" not in ray_container(pod)["resources"]["limits"]
    # KubeRay submits the Serve config once the head is ready: the builder sizes the replicas
    # from the resources present then, so they must fit the head alone
    head = cluster_spec("cpu-demo.yaml")["headGroupSpec"]
    head_cpus = int(
        head["rayStartParams"].get(
            "num-cpus", ray_container(head["template"]["spec"])["resources"]["limits"]["cpu"]
        )
    )
    replica_resources(cfg, float(head_cpus), 0.0)


# -- images and versions --------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_images_are_pinned_and_ray_matches_the_installed_version(name: str) -> None:
    assert cluster_spec(name)["rayVersion"] == ray.__version__
    for pod in pod_specs(name):
        for c in pod["containers"] + pod.get("initContainers", []):
            repo, _, tag = c["image"].rpartition(":")
            assert repo and tag and tag != "latest" and "/" not in tag, c["image"]
            assert f"-ray{ray.__version__}-" in tag, c["image"]


def test_dockerfile_builds_on_the_pinned_ray_image() -> None:
    text = (K8S / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1) == ray.__version__
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-\$\{VARIANT\}$", text, re.M)
    assert k8s_render.project_versions()[1] == ray.__version__
    readme = (K8S / "README.md").read_text()
    for variant in ("cpu", "gpu"):  # the documented build commands make the images the manifests name
        assert f"-t {k8s_render.image(variant)} ." in text
        assert f"-t {k8s_render.image(variant)} ." in readme


# -- ports, health, volumes -----------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_http_and_grpc_ports_are_exposed_through_the_serve_service(name: str) -> None:
    config = serve_config(name)
    http, grpc = config["http_options"]["port"], config["grpc_options"]["port"]
    assert (http, grpc) == (8000, 9000)
    for pod in pod_specs(name):
        named = ports(ray_container(pod))
        # "serve": KubeRay's serve Service and worker readiness probe; "serve-*": also in that Service
        # with ray-project/kuberay#4558
        assert named["serve"] == http
        assert named["serve-grpc"] == grpc
    for path in config["grpc_options"]["grpc_servicer_functions"]:
        module, _, attr = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize("name", SERVICES)
def test_health_is_left_to_kuberay_and_serve(name: str) -> None:
    """No custom probes: KubeRay then injects Raylet/GCS checks and, on workers, the Serve proxy's
    /-/healthz; the engine's own health is Serve's `check_health` on each replica."""
    from serving.app import EngineDeployment

    for pod in pod_specs(name):
        assert "livenessProbe" not in ray_container(pod)
        assert "readinessProbe" not in ray_container(pod)
    assert callable(getattr(EngineDeployment.func_or_class, "check_health", None))


def _volume_for(pod: dict[str, Any], mount_path: str) -> dict[str, Any]:
    (mount,) = [m for m in ray_container(pod)["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


def _gi(quantity: str) -> int:
    assert quantity.endswith("Gi"), quantity
    return int(quantity[:-2]) * 2**30


@pytest.mark.parametrize("name", SERVICES)
def test_every_pod_has_shared_memory_and_the_checkpoint(name: str) -> None:
    model = Path(app_config(name).model)
    spec = cluster_spec(name)
    params = [spec["headGroupSpec"]["rayStartParams"], spec["workerGroupSpecs"][0]["rayStartParams"]]
    for pod, start in zip(pod_specs(name), params, strict=True):
        shm = _volume_for(pod, "/dev/shm")["emptyDir"]
        assert shm["medium"] == "Memory"
        assert int(start["object-store-memory"]) < _gi(shm["sizeLimit"])
        models = _volume_for(pod, k8s_render.MODELS_DIR)
        assert model.is_relative_to(k8s_render.MODELS_DIR)
        if name in GPU_SERVICES:
            claim = {"claimName": k8s_render.CHECKPOINT_CLAIM, "readOnly": True}
            assert models["persistentVolumeClaim"] == claim
        else:
            assert "emptyDir" in models and pod["initContainers"][0]["name"] == "make-checkpoint"


def test_the_claim_and_fetch_job_match_the_gpu_manifests() -> None:
    claim, job = load("checkpoint-volume.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["metadata"]["name"] == k8s_render.CHECKPOINT_CLAIM
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == k8s_render.CHECKPOINT_CLAIM
    fetched = {f"{k8s_render.MODELS_DIR}/{repo.split('/')[1]}" for repo in k8s_render.CHECKPOINT_REPOS}
    assert {app_config(name).model for name in GPU_SERVICES} <= fetched


def test_cpu_demo_init_container_makes_the_checkpoint_the_app_loads(monkeypatch, tmp_path: Path) -> None:
    """The init container runs the project's `default_checkpoint` (what `llama4-ep serve` uses)
    with LLAMA4_EP_CACHE set; run it here (a stand-in writer) and check where it lands."""

    (init,) = pod_specs("cpu-demo.yaml")[0]["initContainers"]
    assert init["command"] == ["python", "-c", k8s_render.MAKE_DEFAULT_CHECKPOINT]
    cache = Path({e["name"]: e["value"] for e in init["env"]}["LLAMA4_EP_CACHE"])
    monkeypatch.setenv("LLAMA4_EP_CACHE", str(tmp_path))
    monkeypatch.setattr(
        model.synthetic,
        "make_checkpoint",
        lambda preset, out, seed, **skew: (Path(out) / "config.json").write_text("{}"),
    )
    made = model.synthetic.default_checkpoint()
    assert str(cache / made.relative_to(tmp_path)) == app_config("cpu-demo.yaml").model

"""The application's arguments, its placement arithmetic, the Serve config file and the stubs,
without starting Serve."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from attention.threads import PARALLEL_MIN_TOKENS
from router.rebalancing import RebalanceConfig
from serving.app import (
    REPLICA_CPUS,
    ServeAppConfig,
    build_app,
    engine_threads,
    replica_resources,
    scaling_options,
)
from serving.proto_gen import PROTO, STUBS, generate

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_one_attention_and_two_expert_workers():
    cfg = ServeAppConfig()
    assert (cfg.attention_workers, cfg.expert_workers) == (1, 2)
    assert cfg.cluster_config().num_workers == 3
    assert cfg.cluster_config().transport == "auto"


def test_the_transport_reaches_the_cluster_and_sockets_refuse_gpus():
    assert ServeAppConfig(transport="collective").cluster_config().transport == "collective"
    with pytest.raises(ValidationError, match="sockets transport carries CPU tensors only"):
        ServeAppConfig(transport="sockets", device="cuda")
    with pytest.raises(ValidationError, match="transport"):
        ServeAppConfig(transport="shm")


@pytest.mark.parametrize(
    "args",
    [
        {"expert_workers": -1},
        {"attention_workers": 0},
        {"device": "tpu"},
        {"engine": {"dtype": "float7"}},
        {"engine": {"num_kv_blocks": 0}},
        {"autoscaling": {"min_replicas": 3, "max_replicas": 2}},
        {"max_queued_requests": 0},
        {"expert_wokers": 2},
        {"autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 3}},
        {"autoscaling": {"upscale_delay_s": -1}},
        {"redundant_slots": -1},
        {"rebalance": {"interval_steps": 0}},
        {"rebalance": {"enabled": True, "intervall_steps": 8}},
        {"expert_workers": 0, "rebalance": {"enabled": True}},
        {"expert_workers": 0, "redundant_slots": 1},
        {"engine": {"kv_cache_memory": 0}},
        {"engine": {"kv_cache_memory": "lots"}},
        {"engine": {"dtype": "auto", "kv_cache_memory": 7}},
        {"engine": {"parallel_min_tokens": 0}},
        {"engine": {"parallel_min_tokens": "fast"}},
    ],
)
def test_bad_arguments_are_refused(args):
    with pytest.raises(ValidationError):
        ServeAppConfig.model_validate(args)


def test_autoscaling_delays_and_replication_reach_serve_and_the_cluster():
    from ray.serve.config import AutoscalingConfig

    cfg = ServeAppConfig(
        autoscaling={"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 1, "downscale_delay_s": 5},
        redundant_slots=2,
        rebalance={"enabled": True, "interval_steps": 8},
    )
    serve_cfg = AutoscalingConfig(**scaling_options(cfg)["autoscaling_config"])
    assert (serve_cfg.upscale_delay_s, serve_cfg.downscale_delay_s, serve_cfg.max_replicas) == (1, 5, 3)
    cluster = cfg.cluster_config()
    assert cluster.redundant_slots_per_worker == 2
    assert cluster.rebalance.enabled and cluster.rebalance.interval_steps == 8
    assert not ServeAppConfig().cluster_config().rebalance.enabled


def test_rebalance_args_carry_every_policy_field_with_its_defaults():
    # the app's defaults are the policy's, but off
    assert ServeAppConfig().cluster_config().rebalance == replace(RebalanceConfig(), enabled=False)
    cfg = ServeAppConfig(rebalance={"enabled": True, "shift_steps": 16, "shift_threshold": None})
    policy = cfg.cluster_config().rebalance
    assert (policy.shift_steps, policy.shift_threshold) == (16, None)
    for bad in ({"shift_steps": 0}, {"shift_threshold": 0}, {"shift_threshold": float("nan")}):
        with pytest.raises(ValidationError):
            ServeAppConfig.model_validate({"rebalance": bad})


def test_disaggregated_replica_holds_its_workers_in_its_own_bundles():
    opts = replica_resources(ServeAppConfig(attention_workers=1, expert_workers=2), 2.0, 0.0)
    bundles = opts["placement_group_bundles"]
    assert bundles[0] == {"CPU": REPLICA_CPUS} == {"CPU": opts["ray_actor_options"]["num_cpus"]}
    assert len(bundles) == 4
    assert sum(b["CPU"] for b in bundles) <= 2.0


def test_replicas_share_the_cpus_and_gpu_workers_get_a_gpu_each():
    cfg = ServeAppConfig(autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8})
    bundles = replica_resources(cfg, 8.0, 0.0)["placement_group_bundles"]
    assert 2 * sum(b["CPU"] for b in bundles) <= 8.0
    gpu_cfg = ServeAppConfig(device="cuda", expert_workers=3)
    gpu = replica_resources(gpu_cfg, 16.0, 4.0)["placement_group_bundles"]
    assert [b.get("GPU", 0) for b in gpu] == [0, 1, 1, 1, 1]
    assert scaling_options(cfg) == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8}
    }
    assert scaling_options(ServeAppConfig()) == {"num_replicas": 1}


def test_colocated_replica_runs_the_model_itself():
    opts = replica_resources(ServeAppConfig(expert_workers=0), 2.0, 0.0)
    assert "placement_group_bundles" not in opts
    assert opts["ray_actor_options"]["num_cpus"] == 1.0


def test_a_colocated_gpu_replica_computes_on_its_gpu(tiny_maverick):
    """The replica reserves one GPU, and its engine (no expert workers) is told to use it."""
    args = {"model": str(tiny_maverick), "expert_workers": 0, "device": "cuda"}
    cfg = ServeAppConfig.model_validate({**args, "engine": {"kv_cache_memory": "2GiB"}})
    assert replica_resources(cfg, 8.0, 1.0)["ray_actor_options"]["num_gpus"] == 1.0
    app_args = {**args, "engine": {"kv_cache_memory": 0.9}}
    app = call_user_app_builder_with_args_if_necessary(build_app, app_args)
    engine_spec = app._bound_deployment.init_args[0]._bound_deployment.init_args[0]
    assert engine_spec.cluster is None
    assert (engine_spec.engine.device, engine_spec.engine.dtype) == ("cuda", "auto")
    assert engine_spec.engine.kv_cache_memory == 0.9
    assert cfg.engine.to_config(cfg.device).kv_cache_memory == 2 * 2**30


def test_fixed_sizes_do_not_depend_on_the_cluster_right_now():
    """An autoscaling cluster (KubeRay) adds nodes while the placement group waits, so fixed
    bundle sizes are not checked against what is there when the app is deployed."""
    options = replica_resources(ServeAppConfig(expert_workers=4, cpus_per_worker=1.0), 2.0, 0.0)
    assert options["placement_group_bundles"][1:] == [{"CPU": 1.0}] * 5
    gpu = replica_resources(ServeAppConfig(expert_workers=4, device="cuda"), 1.0, 0.0)
    assert gpu["placement_group_bundles"][1:] == [{"GPU": 1.0, "CPU": 1.0}] * 5


def test_serve_validates_the_builder_arguments(tiny_maverick):
    app = call_user_app_builder_with_args_if_necessary(build_app, {"model": str(tiny_maverick)})
    ingress = app._bound_deployment
    assert ingress.name == "Ingress"
    engine_spec = ingress.init_args[0]._bound_deployment.init_args[0]
    assert engine_spec.model_dir == str(tiny_maverick) and engine_spec.cluster.num_workers == 3
    with pytest.raises(ValidationError, match="expert_workers"):
        call_user_app_builder_with_args_if_necessary(build_app, {"expert_workers": "many"})


def test_the_repository_serve_config_is_valid():
    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "serving.app:build_app"
    ServeAppConfig.model_validate(app.args)
    (servicer,) = schema.grpc_options.grpc_servicer_functions
    module, _, func = servicer.rpartition(".")
    assert callable(getattr(__import__(module, fromlist=[func]), func))


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    generate(tmp_path, PROTO)
    here = ROOT / "serving" / "proto_gen"
    for name in STUBS:
        assert (tmp_path / name).read_text() == (here / name).read_text(), f"{name} is stale: regenerate"


def test_vision_workers_and_media_arguments():
    cfg = ServeAppConfig(
        vision_workers=2, media={"max_images_per_prompt": 3, "allowed_media_domains": ["a.b"]}
    )
    assert cfg.cluster_config().num_vision_workers == 2 and cfg.cluster_config().num_workers == 5
    assert "+ 2 vision workers" in cfg.layout()
    media = cfg.media.to_config()
    assert media.max_images_per_prompt == 3 and media.allowed_media_domains == ("a.b",)
    with pytest.raises(ValidationError, match="vision_workers need the disaggregated engine"):
        ServeAppConfig(expert_workers=0, vision_workers=1)
    with pytest.raises(ValidationError, match="is not a directory"):
        ServeAppConfig(media={"allowed_local_media_path": "/no/such/folder"})
    with pytest.raises(ValidationError, match="max_images_per_prompt"):
        ServeAppConfig(media={"max_images_per_prompt": 0})
    bundles = replica_resources(ServeAppConfig(vision_workers=1), 4.0, 0.0)["placement_group_bundles"]
    assert len(bundles) == 1 + 1 + 2 + 1  # the replica, attention, experts, vision


def test_the_single_process_engine_computes_on_its_share_of_the_cpus():
    single = ServeAppConfig(expert_workers=0)
    # the replica reserves at most 1 CPU (Ray's OMP_NUM_THREADS would then be 1), its math uses 2
    assert replica_resources(single, 2.0, 0.0)["ray_actor_options"]["num_cpus"] == 1.0
    assert engine_threads(single, 2.0) == 2
    two = ServeAppConfig(expert_workers=0, autoscaling={"min_replicas": 1, "max_replicas": 2})
    assert engine_threads(two, 2.0) == 1 and engine_threads(two, 0.5) == 1
    assert engine_threads(ServeAppConfig(expert_workers=0, threads=3), 2.0) == 3
    assert engine_threads(ServeAppConfig(), 2.0) is None  # the cluster engine computes in its workers
    with pytest.raises(ValidationError, match="threads sizes the single-process engine"):
        ServeAppConfig(threads=2)


def test_the_ingress_colocates_with_the_single_process_engine_only():
    cfg = ServeAppConfig(expert_workers=0, colocate_ingress=True)
    assert cfg.layout() == "single-process engine, ingress in its replica"
    with pytest.raises(ValidationError, match="colocate_ingress needs the single-process engine"):
        ServeAppConfig(colocate_ingress=True)


def test_the_single_process_engine_steps_in_a_child_process_unless_told_otherwise():
    assert ServeAppConfig(expert_workers=0).engine_process
    on_thread = ServeAppConfig(expert_workers=0, engine_process=False)
    assert on_thread.layout() == "single-process engine, stepped on a thread of its replica"
    with pytest.raises(ValidationError, match="engine_process places the single-process engine"):
        ServeAppConfig(engine_process=False)
    assert ServeAppConfig(expert_workers=0).engine_restarts == 3
    with pytest.raises(ValidationError, match="engine_restarts"):
        ServeAppConfig(expert_workers=0, engine_restarts=-1)


def test_the_layers_thread_setting_reaches_the_engine_config():
    assert ServeAppConfig().engine.to_config().parallel_min_tokens == PARALLEL_MIN_TOKENS == "auto"
    for value in (1, 64, "auto"):
        cfg = ServeAppConfig.model_validate({"engine": {"parallel_min_tokens": value}})
        assert cfg.engine.to_config().parallel_min_tokens == value

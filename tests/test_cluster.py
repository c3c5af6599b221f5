"""cluster.yaml: the AWS Ray cluster launcher config passes Ray's own validator, offline.

`prepare_config` only merges the config with ray/autoscaler/aws/defaults.yaml (a file in the
Ray wheel) and `validate_config` checks it against ray/autoscaler/ray-schema.json plus a few
cross-field rules; neither imports boto3 nor touches the network (the AWS calls happen later,
in the provider's bootstrap_config during `ray up`). The tests block sockets to keep it so.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails loudly, so validation provably runs offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def load() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def node_types(cfg: dict) -> tuple[dict, dict]:
    """(head node type, the single worker node type)."""
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert len(workers) == 1, "expected exactly one worker node type"
    return head, workers[0]


def test_rays_validator_accepts_it(no_network):
    cfg = yaml.safe_load(open(CLUSTER_YAML))
    validate_config(prepare_config(cfg))


def test_prepare_config_keeps_our_settings(no_network):
    prepared = prepare_config(load())
    assert prepared["cluster_name"] == "hydra-ray"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"
    zones = prepared["provider"]["availability_zone"].split(",")
    assert zones and all(z.startswith("us-west-2") for z in zones)
    assert prepared["auth"]["ssh_user"] == "ubuntu"
    # setup_commands are merged in front of the head/worker setup commands
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert prepared[key][: len(prepared["setup_commands"])] == prepared["setup_commands"]


def test_worker_node_type_is_gpu_and_autoscaling():
    cfg = load()
    _, worker = node_types(cfg)
    assert worker["resources"].get("GPU", 0) >= 1
    assert worker["resources"].get("CPU", 0) >= 1
    assert worker["min_workers"] <= worker["max_workers"]
    assert worker["max_workers"] >= 8
    # the documented elastic range `--workers 4-8` lies within the node type's range
    assert worker["min_workers"] <= 4
    assert cfg["max_workers"] >= worker["max_workers"]
    assert cfg["idle_timeout_minutes"] >= 0 and cfg["upscaling_speed"] > 0


def test_head_node_type_has_no_gpu():
    head, _ = node_types(load())
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU", 0) > 0


def test_every_node_type_has_a_well_formed_ami_id():
    for name, t in load()["available_node_types"].items():
        image = t["node_config"].get("ImageId", "")
        assert re.fullmatch(r"ami-([0-9a-f]{8}|[0-9a-f]{17})", image), (name, image)
        assert t["node_config"].get("InstanceType"), name


def test_setup_commands_install_the_synced_project():
    cfg = load()
    assert cfg["file_mounts"]["~/hydra-ray"] == "."
    cmds = cfg["setup_commands"]
    assert any("pip install" in c and "hydra-ray" in c for c in cmds)
    # the GPU image's own torch is used: never pin or pull the CPU torch build
    joined = "\n".join(cmds + cfg.get("head_setup_commands", []) + cfg.get("worker_setup_commands", []))
    assert "torch==" not in joined and "download.pytorch.org/whl/cpu" not in joined


def test_start_ray_commands():
    cfg = load()
    head = cfg["head_start_ray_commands"]
    worker = cfg["worker_start_ray_commands"]
    assert head[0] == "ray stop" and worker[0] == "ray stop"
    start = head[-1]
    assert "ray start --head" in start and "--port=6379" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert "--dashboard-host=0.0.0.0" in start
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker[-1]


def _documented_commands(text: str) -> list[list[str]]:
    """The `hydra-ray ...` commands of a file's comments, continuation lines joined."""
    import shlex

    lines = [line.lstrip("# ").rstrip() for line in text.splitlines() if line.startswith("#")]
    joined, cmds = "", []
    for line in lines:
        joined = f"{joined} {line}".strip()
        if joined.endswith("\\"):
            joined = joined[:-1]
            continue
        m = re.search(r"(?:^|--\s+)hydra-ray (.*)", joined)  # a command line, not prose naming the project
        if m:
            cmds.append(shlex.split(m.group(1)))
        joined = ""
    return cmds


def test_the_commands_the_cluster_file_documents_are_valid_commands():
    """Each `hydra-ray` command of the flow in cluster.yaml's comments parses with today's CLI,
    and its --workers spec is valid: a renamed flag breaks this test, not a user's first job."""
    from hydra_ray.cli import build_parser
    from hydra_ray.train.driver import WorkerSpec

    cmds = _documented_commands(CLUSTER_YAML.read_text())
    assert {c[0] for c in cmds} >= {"train", "analyze", "serve"}, cmds
    for argv in cmds:
        args = build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown flag
        if argv[0] == "train":
            assert WorkerSpec.parse(args.workers).max_workers > 1 and args.gpu
            assert args.storage.startswith("s3://")


def test_every_node_reaches_the_run_bucket_through_an_instance_profile():
    """Storage defaults to a bucket: head (job driver) and GPU workers both carry the profile."""
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    for name, node in cfg["available_node_types"].items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name


def _unknown_top_level_key(c):
    c["gpus_per_worker"] = 1


def _max_workers_string(c):
    c["max_workers"] = "8"


def _fractional_gpu(c):
    node_types(c)[1]["resources"]["GPU"] = 0.5


def _worker_without_resources(c):
    del node_types(c)[1]["resources"]


def _unknown_node_type_key(c):
    node_types(c)[1]["gpus"] = 1


def _head_type_not_defined(c):
    c["head_node_type"] = "ray.head.missing"


def _min_workers_over_global_max(c):
    c["max_workers"] = 0


@pytest.mark.parametrize(
    "breakage, error",
    [
        (_unknown_top_level_key, jsonschema.ValidationError),
        (_max_workers_string, jsonschema.ValidationError),
        (_fractional_gpu, jsonschema.ValidationError),
        (_worker_without_resources, jsonschema.ValidationError),
        (_unknown_node_type_key, jsonschema.ValidationError),
        (_head_type_not_defined, ValueError),
        (_min_workers_over_global_max, ValueError),
    ],
)
def test_validator_rejects_broken_copies(no_network, breakage, error):
    broken = copy.deepcopy(load())
    breakage(broken)
    with pytest.raises(error):
        validate_config(prepare_config(broken))


# --------------------------------------------------------------------------- cluster-local.yaml
LOCAL_YAML = CLUSTER_YAML.parent / "cluster-local.yaml"


def test_the_local_cluster_has_cluster_yamls_node_types_scaled_to_one_machine(no_network):
    local, aws = yaml.safe_load(LOCAL_YAML.read_text()), load()
    validate_config(local)  # Ray's schema (prepare_config needs a defaults file the wheel lacks)
    assert local["provider"]["type"] == "fake_multinode"
    assert local["head_node_type"] == aws["head_node_type"]
    assert set(local["available_node_types"]) == set(aws["available_node_types"])
    head, worker = node_types(local)
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 1
    assert worker["resources"]["CPU"] == 1 and (worker["min_workers"], worker["max_workers"]) == (0, 3)
    assert local["max_workers"] == 3
    # training is pinned to worker nodes by the same resource on both clusters
    assert worker["resources"]["trainer"] == 1 and node_types(aws)[1]["resources"]["trainer"] == 1
    assert "trainer" not in head["resources"] and "trainer" not in node_types(aws)[0]["resources"]

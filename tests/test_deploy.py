"""The cluster files in deploy/: parsed and checked offline (no network, no cluster).

What must hold: the KubeRay RayJob and the cluster-launcher YAML have the fields their tools require; token
authentication is on wherever Ray starts; the dashboard is not published (no LoadBalancer, NodePort or
Ingress; loopback on the launcher's head); the images' Ray version and the install lines agree with
pyproject.toml; the launcher file passes Ray's own schema and the checks `ray up` makes before it calls AWS.
Each checker returns a list of problems, and the mutation tests show it reports a broken copy.
"""
from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "deploy" / "kuberay-rayjob.yaml"
LAUNCHER = REPO / "deploy" / "cluster-aws.yaml"
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)(?P<platform>-cpu|-gpu|-cu\d+)?$")
GPU_PLATFORMS = re.compile(r"^-(gpu|cu\d+)$")
LOOPBACK = {"127.0.0.1", "localhost"}


# ---------------------------------------------------------------- pyproject.toml

def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _project_requirements() -> list[Requirement]:
    return [Requirement(text) for text in _pyproject()["project"]["dependencies"]]


def _ray_specifier() -> SpecifierSet:
    (ray,) = [r for r in _project_requirements() if canonicalize_name(r.name) == "ray"]
    return ray.specifier


def requirement_problems(install: list[str], expected: list[Requirement]) -> list[str]:
    """Every expected requirement must be installed with the same extras, specifier and marker."""
    got = {}
    for text in install:
        req = Requirement(text)
        got[canonicalize_name(req.name)] = req
    problems = []
    for req in expected:
        have = got.get(canonicalize_name(req.name))
        if have is None:
            problems.append(f"{req}: not in the install line")
        elif (have.extras, have.specifier, have.marker) != (req.extras, req.specifier, req.marker):
            problems.append(f"{req}: installed as {have}")
    return problems


def image_problems(images: list[str], ray_version: str | None = None) -> list[str]:
    """rayproject/ray images of one Ray version (pyproject's ray specifier allows it) and one Python version
    (pyproject's requires-python allows it)."""
    problems, rays, pythons = [], set(), set()
    for image in images:
        m = RAY_IMAGE.match(image)
        if not m:
            problems.append(f"{image}: not a rayproject/ray:<version>-py3XY[-gpu] tag")
            continue
        rays.add(m["ray"])
        pythons.add(m["py"])
    if len(rays) > 1 or len(pythons) > 1:
        problems.append(f"images disagree: Ray {sorted(rays)}, Python {sorted(pythons)}")
    for version in rays:
        if version not in _ray_specifier():
            problems.append(f"Ray {version} does not satisfy pyproject's ray{_ray_specifier()}")
        if ray_version is not None and version != ray_version:
            problems.append(f"image Ray {version} != rayVersion {ray_version}")
    requires_python = SpecifierSet(_pyproject()["project"]["requires-python"])
    for py in pythons:
        if f"{py[0]}.{py[1:]}" not in requires_python:
            problems.append(f"Python {py[0]}.{py[1:]} does not satisfy requires-python {requires_python}")
    return problems


# ---------------------------------------------------------------- KubeRay

def _load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture
def kuberay_docs() -> list[dict]:
    return _load_all(KUBERAY)


def _rayjob(docs: list[dict]) -> dict:
    (job,) = [d for d in docs if d.get("kind") == "RayJob"]
    return job


def _cluster_specs(docs: list[dict]) -> list[dict]:
    """The RayCluster specs in the documents: a RayCluster's spec, a RayJob's rayClusterSpec."""
    specs = []
    for doc in docs:
        if doc.get("kind") == "RayCluster":
            specs.append(doc["spec"])
        elif doc.get("kind") == "RayJob" and "rayClusterSpec" in doc.get("spec", {}):
            specs.append(doc["spec"]["rayClusterSpec"])
    return specs


def _groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, pod spec) of the head and of every worker group."""
    groups = [("head", spec["headGroupSpec"]["template"]["spec"])]
    groups += [(f"worker group {g['groupName']}", g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return groups


def _ray_container(pod: dict) -> dict:
    return pod["containers"][0]  # KubeRay: the Ray container is the first one


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def kuberay_auth_problems(docs: list[dict]) -> list[str]:
    """Token authentication on, the token from a Secret (never written in the manifest), in every Ray
    container: the operator's authOptions and the containers' own RAY_AUTH_MODE / RAY_AUTH_TOKEN."""
    problems = []
    specs = _cluster_specs(docs)
    if not specs:
        problems.append("no RayCluster spec")
    for spec in specs:
        auth = spec.get("authOptions") or {}
        if auth.get("mode") != "token":
            problems.append(f"authOptions.mode is {auth.get('mode')!r}, not 'token'")
        secret = auth.get("secretName")
        for name, pod in _groups(spec):
            env = _env(_ray_container(pod))
            if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
                problems.append(f"{name}: RAY_AUTH_MODE is not 'token'")
            token = env.get("RAY_AUTH_TOKEN", {})
            ref = token.get("valueFrom", {}).get("secretKeyRef", {})
            if "value" in token or not ref:
                problems.append(f"{name}: RAY_AUTH_TOKEN does not come from a Secret")
            elif (ref.get("name"), ref.get("key")) != (secret, "auth_token"):
                problems.append(f"{name}: RAY_AUTH_TOKEN from {ref}, not authOptions' Secret {secret!r}")
    return problems


def exposure_problems(docs: list[dict]) -> list[str]:
    """Ways the dashboard (or any Ray port) would be reachable from outside the Kubernetes cluster."""
    problems = []
    for doc in docs:
        kind = doc.get("kind")
        if kind == "Service" and doc.get("spec", {}).get("type") in ("LoadBalancer", "NodePort"):
            problems.append(f"Service {doc['metadata']['name']} of type {doc['spec']['type']}")
        if kind in ("Ingress", "Route", "Gateway", "HTTPRoute"):
            problems.append(f"{kind} {doc['metadata']['name']}")
    for spec in _cluster_specs(docs):
        head = spec["headGroupSpec"]
        if head.get("serviceType", "ClusterIP") != "ClusterIP":
            problems.append(f"head serviceType {head['serviceType']}")
        if head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"headService of type {head['headService']['spec']['type']}")
        if head.get("enableIngress"):
            problems.append("headGroupSpec.enableIngress")
        for name, pod in _groups(spec):
            if pod.get("hostNetwork"):
                problems.append(f"{name}: hostNetwork")
            for container in pod["containers"]:
                for port in container.get("ports", []):
                    if "hostPort" in port:
                        problems.append(f"{name}: hostPort {port['hostPort']}")
    return problems


def storage_secret_problems(docs: list[dict]) -> list[str]:
    """Object-storage credentials reach every Ray container from a Secret, never as literal values."""
    problems = []
    for spec in _cluster_specs(docs):
        for name, pod in _groups(spec):
            container = _ray_container(pod)
            if not any("secretRef" in source for source in container.get("envFrom", [])):
                problems.append(f"{name}: no envFrom secretRef for the storage credentials")
            for var, entry in _env(container).items():
                if var.startswith("AWS_") and "value" in entry:
                    problems.append(f"{name}: {var} written in the manifest")
    return problems


def test_kuberay_manifest_has_the_fields_kuberay_requires(kuberay_docs):
    job = _rayjob(kuberay_docs)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["name"]
    assert job["spec"]["entrypoint"]
    (spec,) = _cluster_specs(kuberay_docs)
    assert spec["rayVersion"]
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and _ray_container(head["template"]["spec"])["image"]
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", group["replicas"])


def test_kuberay_workers_have_a_gpu_and_the_head_none(kuberay_docs):
    (spec,) = _cluster_specs(kuberay_docs)
    head = _ray_container(spec["headGroupSpec"]["template"]["spec"])
    for part in ("requests", "limits"):
        assert "nvidia.com/gpu" not in head.get("resources", {}).get(part, {})
    for group in spec["workerGroupSpecs"]:
        container = _ray_container(group["template"]["spec"])
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert GPU_PLATFORMS.match(RAY_IMAGE.match(container["image"])["platform"] or "")


def test_kuberay_token_auth_is_on_with_the_token_from_a_secret(kuberay_docs):
    assert kuberay_auth_problems(kuberay_docs) == []
    text = KUBERAY.read_text()
    assert "kind: Secret" not in text  # the Secrets are made with kubectl, their values stay out of git


@pytest.mark.parametrize("breakage", ["mode disabled", "no env", "literal token", "other secret"])
def test_kuberay_auth_checker_catches(kuberay_docs, breakage):
    docs = copy.deepcopy(kuberay_docs)
    (spec,) = _cluster_specs(docs)
    worker_env = _ray_container(spec["workerGroupSpecs"][0]["template"]["spec"])["env"]
    if breakage == "mode disabled":
        spec["authOptions"]["mode"] = "disabled"
    elif breakage == "no env":
        worker_env[:] = [e for e in worker_env if e["name"] != "RAY_AUTH_MODE"]
    elif breakage == "literal token":
        for e in worker_env:
            if e["name"] == "RAY_AUTH_TOKEN":
                e.pop("valueFrom")
                e["value"] = "hunter2"
    else:
        _env(_ray_container(spec["headGroupSpec"]["template"]["spec"]))["RAY_AUTH_TOKEN"]["valueFrom"][
            "secretKeyRef"]["name"] = "another-token"
    assert kuberay_auth_problems(docs)


def test_kuberay_storage_credentials_come_from_a_secret(kuberay_docs):
    assert storage_secret_problems(kuberay_docs) == []
    docs = copy.deepcopy(kuberay_docs)
    (spec,) = _cluster_specs(docs)
    container = _ray_container(spec["workerGroupSpecs"][0]["template"]["spec"])
    container["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"})
    container.pop("envFrom")
    assert len(storage_secret_problems(docs)) == 2


def test_kuberay_dashboard_is_not_exposed(kuberay_docs):
    assert exposure_problems(kuberay_docs) == []


@pytest.mark.parametrize("breakage", ["LoadBalancer", "NodePort service", "Ingress", "enableIngress",
                                      "hostPort"])
def test_exposure_checker_catches(kuberay_docs, breakage):
    docs = copy.deepcopy(kuberay_docs)
    (spec,) = _cluster_specs(docs)
    head = spec["headGroupSpec"]
    if breakage == "LoadBalancer":
        head["serviceType"] = "LoadBalancer"
    elif breakage == "NodePort service":
        docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"},
                     "spec": {"type": "NodePort", "ports": [{"port": 8265}]}})
    elif breakage == "Ingress":
        docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "dash"}})
    elif breakage == "enableIngress":
        head["enableIngress"] = True
    else:
        _ray_container(head["template"]["spec"])["ports"][1]["hostPort"] = 8265
    assert exposure_problems(docs)


def test_kuberay_images_match_ray_version_and_pyproject(kuberay_docs):
    (spec,) = _cluster_specs(kuberay_docs)
    images = [_ray_container(pod)["image"] for _, pod in _groups(spec)]
    assert image_problems(images, ray_version=spec["rayVersion"]) == []
    assert image_problems(["rayproject/ray:2.30.0-py311-gpu"], ray_version="2.30.0")  # below ray>=2.40
    assert image_problems(["rayproject/ray:2.60.0-py311", "rayproject/ray:2.60.0-py312-gpu"])


def test_kuberay_runtime_env_installs_pyproject_dependencies(kuberay_docs):
    runtime_env = yaml.safe_load(_rayjob(kuberay_docs)["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"]  # the code: run_search.py, search_spaces/, ltsearch/
    assert requirement_problems(runtime_env["pip"], _project_requirements()) == []
    changed = [p.replace("torch>=2.4,<=2.14.1", "torch>=2.4") for p in runtime_env["pip"]]
    (problem,) = requirement_problems(changed, _project_requirements())
    assert problem.startswith("torch") and problem.endswith("installed as torch>=2.4")


def _entrypoint_args(command: str) -> tuple[str, str, list[str]]:
    """(space file, --storage, --set values) of a `python run_search.py` command line."""
    tokens = shlex.split(command)
    assert tokens[:2] == ["python", "run_search.py"], tokens
    storage = tokens[tokens.index("--storage") + 1]
    sets = [tokens[i + 1] for i, t in enumerate(tokens) if t == "--set"]
    return tokens[2], storage, sets


def test_kuberay_entrypoint_is_a_valid_search(kuberay_docs):
    from ltsearch.space import load_search_space

    space, storage, sets = _entrypoint_args(_rayjob(kuberay_docs)["spec"]["entrypoint"])
    assert space == "search_spaces/wd_maxnorm.yaml" and (REPO / space).is_file()
    assert storage.startswith("s3://")
    spec = load_search_space(REPO / space, sets, None)  # the overrides name real keys
    assert spec.search.resources.gpus_per_worker == 1


# ---------------------------------------------------------------- cluster launcher (AWS)

@pytest.fixture
def launcher() -> dict:
    (config,) = _load_all(LAUNCHER)
    return config


def _ray_starts(commands: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """(environment, arguments) of every `ray start` in a list of shell commands. The environment holds
    the command's own VAR=value prefix and what `export` set earlier in the same command."""
    starts = []
    for command in commands:
        exported = {}
        for part in re.split(r";|&&|\|\|", command):
            tokens = shlex.split(part)
            if tokens[:1] == ["export"]:
                exported.update(t.split("=", 1) for t in tokens[1:] if "=" in t)
                continue
            env = dict(exported)
            while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
                key, value = tokens.pop(0).split("=", 1)
                env[key] = value
            if tokens[:2] == ["ray", "start"]:
                starts.append((env, tokens[2:]))
    return starts


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def launcher_auth_problems(config: dict) -> list[str]:
    """RAY_AUTH_MODE=token on every `ray start`, and the token file copied to the nodes."""
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = _ray_starts(config.get(key, []))
        if not starts:
            problems.append(f"{key}: no `ray start`")
        for env, args in starts:
            if env.get("RAY_AUTH_MODE") != "token":
                problems.append(f"{key}: `ray start {' '.join(args)}` without RAY_AUTH_MODE=token")
    if "~/.ray/auth_token" not in config.get("file_mounts", {}):
        problems.append("file_mounts: the token file ~/.ray/auth_token is not copied to the nodes")
    return problems


def launcher_dashboard_problems(config: dict) -> list[str]:
    """The head's dashboard on loopback, and no security-group rule opening a port other than SSH to
    the world."""
    problems = []
    heads = [args for _, args in _ray_starts(config.get("head_start_ray_commands", [])) if "--head" in args]
    if not heads:
        problems.append("head_start_ray_commands: no `ray start --head`")
    for args in heads:
        host = _option(args, "--dashboard-host")
        if host not in LOOPBACK:
            problems.append(f"`ray start --head` with --dashboard-host {host}")
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        if world and (rule.get("FromPort"), rule.get("ToPort")) != (22, 22):
            problems.append(f"security group opens ports {rule.get('FromPort')}-{rule.get('ToPort')} "
                            "to 0.0.0.0/0")
    return problems


def _pip_installs(commands: list[str]) -> list[str]:
    """The requirement arguments of every `pip install` in a list of shell commands."""
    found = []
    for command in commands:
        for part in re.split(r";|&&|\|\|", command):
            tokens = shlex.split(part)
            for i in range(len(tokens) - 1):
                if tokens[i].endswith("pip") and tokens[i + 1] == "install":
                    found += [t for t in tokens[i + 2:] if not t.startswith("-")]
    return found


def test_launcher_has_the_fields_ray_up_requires(launcher):
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert launcher.get(key), key
    assert launcher["provider"]["type"] == "aws"
    assert launcher["head_node_type"] in launcher["available_node_types"]


def test_launcher_passes_rays_schema_and_up_checks(launcher):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert schema_path.is_file()
    jsonschema.validate(launcher, json.loads(schema_path.read_text()))  # the file as written
    # what `ray up` does before it calls AWS: merge aws/defaults.yaml, then validate (schema + node types)
    validate_config(prepare_config(copy.deepcopy(launcher)))


def test_ray_schema_checks_catch_mistakes(launcher):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    typo = copy.deepcopy(launcher)
    typo["head_start_ray_command"] = typo.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(typo))
    unknown_head = copy.deepcopy(launcher)
    unknown_head["head_node_type"] = "ray.head.missing"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(unknown_head))


def test_launcher_token_auth_is_on(launcher):
    assert launcher_auth_problems(launcher) == []
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # a path, not the token


@pytest.mark.parametrize("breakage", ["head", "worker", "mount"])
def test_launcher_auth_checker_catches(launcher, breakage):
    config = copy.deepcopy(launcher)
    if breakage == "mount":
        config["file_mounts"] = {}
    else:
        key = f"{breakage}_start_ray_commands"
        config[key] = [c.replace("RAY_AUTH_MODE=token ", "") for c in config[key]]
    assert launcher_auth_problems(config)
    exported = copy.deepcopy(launcher)  # an `export` earlier in the same command counts too
    exported["worker_start_ray_commands"] = ["export RAY_AUTH_MODE=token; ray start --address=$RAY_HEAD_IP:6379"]
    assert launcher_auth_problems(exported) == []


def test_launcher_dashboard_is_on_loopback(launcher):
    assert launcher_dashboard_problems(launcher) == []


@pytest.mark.parametrize("breakage", ["all interfaces", "no flag", "security group"])
def test_launcher_dashboard_checker_catches(launcher, breakage):
    config = copy.deepcopy(launcher)
    if breakage == "all interfaces":
        config["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1", "--dashboard-host 0.0.0.0")
                                             for c in config["head_start_ray_commands"]]
    elif breakage == "no flag":
        config["head_start_ray_commands"] = [c.replace(" --dashboard-host=127.0.0.1", "")
                                             for c in config["head_start_ray_commands"]]
    else:
        config["provider"]["security_group"] = {"IpPermissions": [
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    assert launcher_dashboard_problems(config)


def test_launcher_has_a_gpu_worker_type_and_a_head_without_trials(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 and t["node_config"]["InstanceType"].startswith(("g", "p"))
               and t.get("min_workers", 0) >= 1 for t in workers)


def test_launcher_images_match_pyproject(launcher):
    docker = launcher["docker"]
    images = [docker["image"], docker.get("head_image", docker["image"]), docker.get("worker_image",
                                                                                      docker["image"])]
    assert image_problems(images) == []
    assert GPU_PLATFORMS.match(RAY_IMAGE.match(docker.get("worker_image", docker["image"]))["platform"] or "")


def test_launcher_setup_installs_pyproject_dependencies(launcher):
    installs = _pip_installs(launcher["setup_commands"])
    assert requirement_problems(installs, _project_requirements()) == []
    assert requirement_problems([i for i in installs if not i.startswith("optuna")], _project_requirements())


def test_both_files_use_one_ray_version_the_one_installed_here(kuberay_docs, launcher):
    """`ray up`, `ray job submit` and the dashboard client come from this environment: keep the clusters'
    Ray equal to it (and to each other)."""
    (spec,) = _cluster_specs(kuberay_docs)
    versions = {spec["rayVersion"]} | {RAY_IMAGE.match(launcher["docker"][k])["ray"]
                                       for k in ("image", "head_image") if k in launcher["docker"]}
    assert versions == {importlib.metadata.version("ray")}

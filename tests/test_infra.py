"""Keep infra/ honest without a cluster: the Dockerfile, the lock file, the KubeRay
manifests and the cluster launcher YAML against each other, against the repository
(entrypoints, config paths, the image's tag) and against the pipeline's own settings
(GPUs and cores per worker, encoder and decoder counts), plus offline schema checks:
Kubernetes' own JSON schemas (kubernetes-validate) for core kinds and pod templates,
a trimmed KubeRay CRD schema (infra/schemas/) for RayCluster and RayJob, and Ray's schema
for the launcher YAML. Nothing here builds an image or talks to a cluster.
"""
from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.config import CPUS_PER_GPU_WORKER, PreprocessConfig

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "ray-cluster-aws.yaml"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes minor the manifests promise to work with (CronJob.timeZone is GA
# from 1.27 on).
KUBERNETES_VERSION = "1.30"
NAMESPACE = "sttm"
GPU = "nvidia.com/gpu"
# Images that are not this project's build: pinned tools, nothing else.
TOOL_IMAGES = {"registry.k8s.io/kubectl:v1.34.0"}
# Which job config each Ray cluster definition is sized for.
CLUSTER_CONFIGS = {
    "raycluster.yaml": "jobs/configs/corpus.yaml",   # sttm submit jobs/configs/corpus.yaml
    "rayjob.yaml": "jobs/configs/nightly.yaml",      # its entrypoint's --config
}
SECRET_ENV_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN",
                    "HUGGING_FACE_HUB_TOKEN"}


# --------------------------------------------------------------------------- helpers

def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> dict[str, list[dict]]:
    """File name -> its Kubernetes objects, for every file of infra/kuberay/."""
    return {path.name: load_docs(path) for path in sorted(KUBERAY.glob("*.yaml"))}


def all_objects() -> list[dict]:
    return [doc for docs in manifests().values() for doc in docs]


def one(kind: str, name: str | None = None) -> dict:
    found = [doc for doc in all_objects() if doc["kind"] == kind
             and name in (None, doc["metadata"].get("name"))]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def rayjob() -> dict:
    (doc,) = load_docs(KUBERAY / "rayjob.yaml")
    return doc


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every pod a RayCluster or RayJob makes."""
    spec = cluster_spec(doc)
    found = [("head", spec["headGroupSpec"]["template"])]
    found += [(f"worker group {group['groupName']}", group["template"]) for group in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        found.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return found


def walk(value, path=()):
    """Every (path, value) pair in a parsed YAML tree."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk(item, path + (index,))


def dockerfile_labels() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return dict(re.findall(r'([\w.-]+)="([^"]*)"', "\n".join(
        line for line in text.splitlines() if line.strip().startswith("LABEL"))))


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE))


def image_names() -> tuple[str, str]:
    labels = dockerfile_labels()
    name = f"{labels['io.sttm-pipeline.image.repository']}:{labels['org.opencontainers.image.version']}"
    return name, f"{name}-cpu"


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (INFRA / "requirements-lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!_-]+)", line)
            assert match, f"requirements-lock.txt: {line!r} is not an exact name==version pin"
            name = canonicalize_name(match[1])
            assert name not in pins, f"requirements-lock.txt pins {name} twice"
            pins[name] = match[2]
    return pins


def quantity(value) -> float:
    """A Kubernetes CPU or GPU quantity as a number ("8", 8, "500m")."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kuberay_schema(kind: str) -> jsonschema.protocols.Validator:
    """The trimmed CRD schema of ``kind`` (RayCluster or RayJob)."""
    schema = json.loads((INFRA / "schemas" / "kuberay-v1.schema.json").read_text())
    assert kind in schema["$defs"], f"no schema for ray.io kind {kind}"
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{kind}", "$defs": schema["$defs"]})


def where(error: jsonschema.ValidationError) -> str:
    return ".".join(map(str, error.absolute_path)) or "the top level"


def check_kubernetes(doc: dict) -> None:
    """Validate one object offline, raising AssertionError naming the field: core kinds
    against Kubernetes' schemas, ray.io kinds against the trimmed CRD schema plus
    Kubernetes' PodTemplateSpec for every pod they make."""
    name = f"{doc.get('kind')} {doc.get('metadata', {}).get('name') or doc.get('metadata', {}).get('generateName')}"
    if doc["apiVersion"].startswith("ray.io/"):
        error = jsonschema.exceptions.best_match(kuberay_schema(doc["kind"]).iter_errors(doc))
        if error is not None:
            raise AssertionError(f"{name}: {error.message} at {where(error)}")
        for pod, template in pod_templates(doc):
            try:
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                              "metadata": {"name": "check"}, "template": template},
                                             KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                raise AssertionError(f"{name}, {pod} pod: {error.message} at {where(error)}") from None
    else:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{name}: {error.message} at {where(error)}") from None


# --------------------------------------------------------------------------- parsing and schemas

def test_every_yaml_file_parses():
    files = sorted([*INFRA.rglob("*.yaml"), *(ROOT / "jobs" / "configs").glob("*.yaml")])
    assert len(files) >= 9
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    for docs in manifests().values():
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), doc


def test_core_manifests_match_kubernetes_schemas():
    kinds = set()
    for name, docs in manifests().items():
        for doc in docs:
            check_kubernetes(doc)
            kinds.add(doc["kind"])
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob",
            "RayCluster", "RayJob"} <= kinds


def test_the_nightly_configmaps_rayjob_is_checked_too():
    data = one("ConfigMap", "sttm-nightly-rayjob")["data"]
    check_kubernetes(yaml.safe_load(data["rayjob.yaml"]))


@pytest.mark.parametrize("mutate, error", [
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplica=1), "minReplica"),
    (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "not of type 'string'"),
    (lambda d: d["spec"].update(enableInTreeAutoscalling=True), "enableInTreeAutoscalling"),
    (lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(imagee="x"), "imagee"),
    (lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"].update(
        requests=[1]), "resources"),
])
def test_schema_checks_reject_mistakes(mutate, error):
    """The checks above can fail: a misspelt or mistyped field in a copy is caught."""
    doc = copy.deepcopy(one("RayCluster"))
    mutate(doc)
    with pytest.raises(AssertionError, match=error):
        check_kubernetes(doc)
    cronjob = copy.deepcopy(one("CronJob"))
    cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolice"] = "Never"
    with pytest.raises(AssertionError, match="restartPolice"):
        check_kubernetes(cronjob)


def test_launcher_yaml_matches_rays_schema():
    schema = json.loads((importlib.resources.files("ray") / "autoscaler" / "ray-schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    config = load_docs(LAUNCHER)[0]
    validator.validate(config)
    broken = {**config, "max_worker": 8}
    assert not validator.is_valid(broken)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


# --------------------------------------------------------------------------- image, lock, versions

def test_dockerfile_declares_the_projects_name_and_version():
    labels = dockerfile_labels()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.title"] == project["name"]
    assert labels["io.sttm-pipeline.image.repository"] == "ghcr.io/sttm-pipeline/sttm-pipeline"
    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    assert args["VARIANT"] == "cuda"
    assert re.search(r"^FROM nvidia/cuda:\S+ AS base-cuda$", text, flags=re.MULTILINE)
    assert re.search(r"^FROM ubuntu:\S+ AS base-cpu$", text, flags=re.MULTILINE)
    assert "FROM base-${VARIANT}" in text
    assert "COPY infra/requirements-lock.txt" in text and "-r /tmp/requirements-lock.txt" in text
    # torch: the release CI installs (.ci/run), CUDA or CPU build by variant.
    ci_torch = re.search(r"pip install torch==(\S+)", (ROOT / ".ci" / "run").read_text())[1]
    assert args["TORCH_VERSION"] == ci_torch
    assert '"torch==${TORCH_VERSION}+cpu"' in text and "download.pytorch.org/whl/cpu" in text
    # The Python the lock was resolved on.
    lock_python = re.search(r"^# Resolved on Python (\S+) ", (INFRA / "requirements-lock.txt").read_text(),
                            flags=re.MULTILINE)[1]
    assert args["PYTHON_VERSION"] == lock_python


def dockerfile_user() -> tuple[int, int]:
    users = re.findall(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert len(users) == 1, "the Dockerfile sets one numeric USER uid:gid (Kubernetes checks runAsNonRoot by it)"
    uid, gid = map(int, users[0])
    assert uid != 0
    return uid, gid


def test_lock_pins_the_projects_dependencies():
    pins = lock_pins()
    assert not [name for name in pins if name == "torch" or name.startswith(("nvidia-", "cuda-", "triton"))], \
        "torch and its CUDA libraries are installed by the Dockerfile, per variant"
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert requirement.specifier.contains(dockerfile_args()["TORCH_VERSION"])
            continue
        assert name in pins, f"{name} (pyproject.toml) is not pinned in infra/requirements-lock.txt; " \
                             f"run python infra/make_lock.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"lock pins {name}=={pins[name]}, pyproject.toml wants {requirement}"
    # ray[default] (dashboard, Jobs API, autoscaler) and boto3 (the launcher's AWS provider).
    assert {"aiohttp-cors", "py-spy", "opencensus", "boto3"} <= set(pins)


def test_ray_version_is_the_images_everywhere():
    ray_version = lock_pins()["ray"]
    for doc in all_objects():
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert cluster_spec(doc)["rayVersion"] == ray_version, doc["kind"]


def test_every_image_is_the_dockerfiles_build():
    cuda, cpu = image_names()
    seen = []
    for path in [*KUBERAY.glob("*.yaml"), LAUNCHER]:
        for doc in load_docs(path):
            for where, value in walk(doc):
                if where and where[-1] in ("image", "head_image", "worker_image"):
                    assert value in (cuda, cpu) or value in TOOL_IMAGES, f"{path.name} {where}: {value}"
                    seen.append(value)
    assert cuda in seen
    # GPU pods need the CUDA build.
    for doc in all_objects():
        if doc["kind"] in ("RayCluster", "RayJob"):
            for where, template in pod_templates(doc):
                for container in template["spec"]["containers"]:
                    if GPU in container.get("resources", {}).get("limits", {}):
                        assert container["image"] == cuda, where
    assert load_docs(LAUNCHER)[0]["docker"]["image"] == cuda
    assert all(not image.endswith(":latest") for image in TOOL_IMAGES)


def test_ray_pods_run_as_the_images_non_root_user():
    uid, gid = dockerfile_user()
    for doc in all_objects():
        if doc["kind"] in ("RayCluster", "RayJob"):
            for where, template in pod_templates(doc):
                context = template["spec"]["securityContext"]
                assert context["runAsNonRoot"] is True, where
                assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid), where
    cronjob_pod = one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cronjob_pod["securityContext"]["runAsNonRoot"] is True


def test_dockerignore_keeps_what_the_build_needs():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        """Docker's rule: a pattern that matches the path or one of its parent folders
        leaves it out; "**/" matches at any depth."""
        parts = PurePosixPath(path).parts
        prefixes = [parts[:i] for i in range(1, len(parts) + 1)]
        for pattern in patterns:
            for prefix in prefixes:
                if pattern.startswith("**/"):
                    if any(fnmatch("/".join(prefix[j:]), pattern[3:]) for j in range(len(prefix))):
                        return True
                elif fnmatch("/".join(prefix), pattern):
                    return True
        return False

    for needed in ["pyproject.toml", "README.md", "infra/requirements-lock.txt", "sttm/merging.py",
                   "pipeline/run.py", "jobs/preprocess.py", "jobs/configs/nightly.yaml",
                   "schemas/token_set.json", "pipeline/samples/bikes.mp4"]:
        assert (ROOT / needed).exists(), needed
        assert not ignored(needed), f".dockerignore leaves {needed} out of the build"
    for unwanted in [".venv/bin/python", ".git/HEAD", "tests/test_infra.py", "pipeline/__pycache__/run.cpython-311.pyc",
                     "sttm_pipeline.egg-info/PKG-INFO", ".ci-venv/bin/python"]:
        assert ignored(unwanted), f".dockerignore should leave {unwanted} out"


# --------------------------------------------------------------------------- the repository's paths

def test_the_rayjob_runs_the_repositorys_entrypoint_with_a_mounted_config():
    job = rayjob()
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "jobs.preprocess"]
    assert importlib.util.find_spec("jobs.preprocess") is not None
    # Its options are ones jobs.preprocess accepts.
    help_text = subprocess.run([sys.executable, "-m", "jobs.preprocess", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120, check=True).stdout
    options = [word for word in command[3:] if word.startswith("--")]
    assert options == ["--config"]
    assert all(option in help_text for option in options)
    config_path = PurePosixPath(command[command.index("--config") + 1])

    # The path lies in a ConfigMap volume mounted on the head, where the driver runs ...
    head = cluster_spec(job)["headGroupSpec"]["template"]["spec"]
    mounts = {mount["name"]: PurePosixPath(mount["mountPath"]) for mount in head["containers"][0]["volumeMounts"]}
    volume = next(v for v in head["volumes"] if v["name"] in mounts and config_path.parent == mounts[v["name"]])
    configmap = one("ConfigMap", volume["configMap"]["name"])
    # ... whose entry is the repository's config file, which PreprocessConfig accepts.
    assert configmap["data"][config_path.name] == (ROOT / CLUSTER_CONFIGS["rayjob.yaml"]).read_text()
    assert config_path.name == PurePosixPath(CLUSTER_CONFIGS["rayjob.yaml"]).name
    PreprocessConfig.from_yaml(ROOT / "jobs" / "configs" / config_path.name)
    # The config map holds exactly jobs/configs/*.yaml.
    assert sorted(configmap["data"]) == sorted(p.name for p in (ROOT / "jobs" / "configs").glob("*.yaml"))


def test_generated_configmaps_are_current():
    spec = importlib.util.spec_from_file_location("render_manifests", INFRA / "render_manifests.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    for path, text in render.rendered().items():
        assert path.read_text() == text, f"{path.name} is stale: run python infra/render_manifests.py"


def test_paths_named_in_infra_and_the_docs_exist():
    readme = (ROOT / "README.md").read_text()
    assert "## Scaling out" in readme, "README.md has a 'Scaling out' section"
    scaling = readme.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    texts = {"README.md (Scaling out)": scaling, "Dockerfile": DOCKERFILE.read_text()}
    texts.update({str(p.relative_to(ROOT)): p.read_text() for p in INFRA.rglob("*")
                  if p.is_file() and p.suffix in (".yaml", ".md", ".sh", ".py")})
    pattern = re.compile(r"(?<![\w/.-])((?:infra|jobs|pipeline|tests)/[\w./-]*\.(?:yaml|py|sh|txt|json|md))")
    checked = set()
    for source, text in texts.items():
        for path in pattern.findall(text):
            assert (ROOT / path).exists(), f"{source} names {path}, which does not exist"
            checked.add(path)
    assert {"infra/ray-cluster-aws.yaml", "jobs/configs/corpus.yaml", "infra/kuberay/rayjob.yaml"} <= checked
    for command in ["sttm preprocess", "ray up infra/ray-cluster-aws.yaml", "sttm submit jobs/configs/corpus.yaml",
                    "ray job submit", "kubectl apply", "kubectl create secret generic sttm-s3-credentials"]:
        assert command in scaling, f"README 'Scaling out' shows `{command}`"


# --------------------------------------------------------------------------- resources vs the pipeline

def gpu_groups(doc: dict) -> list[tuple[dict, dict, int]]:
    """(worker group, its container, GPUs per pod) of every GPU worker group."""
    groups = []
    for group in cluster_spec(doc).get("workerGroupSpecs", []):
        (container,) = group["template"]["spec"]["containers"]
        gpus = int(quantity(container["resources"]["limits"].get(GPU, 0)))
        if gpus:
            groups.append((group, container, gpus))
    return groups


@pytest.mark.parametrize("manifest", sorted(CLUSTER_CONFIGS))
def test_ray_cluster_resources_match_the_jobs_config(manifest):
    (doc,) = [d for d in manifests()[manifest] if d["kind"] in ("RayCluster", "RayJob")]
    config = PreprocessConfig.from_yaml(ROOT / CLUSTER_CONFIGS[manifest])
    spec = cluster_spec(doc)

    # The head runs no decode or encode work and has no GPU.
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert GPU not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})

    groups = gpu_groups(doc)
    assert groups, f"{manifest} has no GPU worker group"
    for group, container, gpus in groups:
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], \
            f"{group['groupName']}: requests = limits, so Ray's numbers are what the node gives"
        # Per GPU: the encoder actor's reserved cores + CPUS_PER_GPU_WORKER decoding cores.
        want_cpus = gpus * (config.cpus_per_encode_worker + CPUS_PER_GPU_WORKER)
        assert quantity(resources["limits"]["cpu"]) == want_cpus, \
            f"{group['groupName']}: {gpus} GPU(s) x ({config.cpus_per_encode_worker} encoder + " \
            f"{CPUS_PER_GPU_WORKER} decode cores) = {want_cpus} CPUs"
        # Ray reads num-cpus / num-gpus from the container; an override must agree.
        params = group["rayStartParams"]
        assert quantity(params.get("num-cpus", want_cpus)) == want_cpus
        assert quantity(params.get("num-gpus", gpus)) == gpus
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]

    max_gpus = sum(group["maxReplicas"] * gpus for group, _, gpus in groups)
    # One encoder actor per GPU the cluster can have: fewer leaves GPUs idle, more never
    # get scheduled and the job waits forever.
    assert config.encode_workers == max_gpus, f"encode_workers {config.encode_workers} != {max_gpus} GPUs"
    # The decode pool fills the decoding cores of a full cluster; the cluster may start
    # with no GPU worker, so both are given rather than read from the cluster at start.
    assert config.decode_concurrency == config.encode_workers * CPUS_PER_GPU_WORKER
    assert config.device == "cuda"


def test_the_nightly_rayjob_has_a_fixed_size_and_ends():
    job = rayjob()
    for group, _, _ in gpu_groups(job):
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["activeDeadlineSeconds"] < 24 * 3600, "a stuck run ends before the next night's"
    assert "generateName" in job["metadata"] and "name" not in job["metadata"]


def test_autoscaling_cluster_bounds():
    cluster = one("RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    for group, _, _ in gpu_groups(cluster):
        assert group["minReplicas"] == 0 < group["maxReplicas"]


def test_launcher_gpu_workers_match_the_pipeline():
    config = load_docs(LAUNCHER)[0]
    corpus = PreprocessConfig.from_yaml(ROOT / "jobs" / "configs" / "corpus.yaml")
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types
    max_gpus = 0
    for name, node_type in gpu_types.items():
        gpus = node_type["resources"]["GPU"]
        assert node_type["resources"]["CPU"] == gpus * (corpus.cpus_per_encode_worker + CPUS_PER_GPU_WORKER), name
        assert node_type["min_workers"] == 0
        max_gpus += node_type["max_workers"] * gpus
    assert corpus.encode_workers == max_gpus
    assert config["max_workers"] >= sum(t["max_workers"] for t in gpu_types.values())
    # The image holds everything: no setup command may install anything on the nodes.
    assert config["setup_commands"] == config["head_setup_commands"] == config["worker_setup_commands"] == []


# --------------------------------------------------------------------------- secrets and the schedule

def test_no_credentials_in_any_file():
    files = [*INFRA.rglob("*"), DOCKERFILE, ROOT / ".dockerignore", *(ROOT / "jobs" / "configs").glob("*")]
    for path in files:
        if not path.is_file() or path.suffix == ".json":
            continue
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path}: an AWS access key id"
        # A value after the name, other than a shell variable ("$AWS_SECRET_ACCESS_KEY").
        assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*(?![\"']?\$)\S", text), \
            f"{path}: a secret access key value"
    for doc in all_objects():
        assert doc["kind"] != "Secret", "Secrets are created with kubectl, never stored in the repository"
        for where, value in walk(doc):
            if isinstance(value, dict) and value.get("name") in SECRET_ENV_NAMES and where and where[-2:-1] == ("env",):
                assert "value" not in value and "valueFrom" in value, f"{where}: {value['name']} written literally"


def test_ray_pods_get_s3_credentials_from_a_secret_or_their_role():
    service_accounts = {doc["metadata"]["name"] for doc in all_objects() if doc["kind"] == "ServiceAccount"}
    for doc in all_objects():
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        for where, template in pod_templates(doc):
            spec = template["spec"]
            # The pod's identity exists (IRSA / Workload Identity annotate it) ...
            assert spec["serviceAccountName"] in service_accounts, where
            for container in spec["containers"]:
                # ... and the optional Secret, for clusters without such roles.
                refs = [source["secretRef"] for source in container.get("envFrom", []) if "secretRef" in source]
                assert {"name": "sttm-s3-credentials", "optional": True} in refs, where


def test_every_namespaced_object_is_in_the_namespace():
    for doc in all_objects():
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE, f"{doc['kind']} {doc['metadata']}"


def test_the_nightly_cronjob_creates_the_rayjob_with_least_privilege():
    cronjob = one("CronJob", "sttm-nightly")
    spec = cronjob["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5 and fields[:2] == ["0", "2"], "nightly at 02:00"
    assert spec["timeZone"] == "Etc/UTC" and spec["concurrencyPolicy"] == "Forbid"

    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"] + container["args"]
    assert command[:3] == ["kubectl", "create", "-f"], "create (not apply): each run gets a generated name"
    manifest = PurePosixPath(command[3])
    mount = next(m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == manifest.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    created = yaml.safe_load(one("ConfigMap", volume["configMap"]["name"])["data"][manifest.name])
    assert created == rayjob(), "the CronJob creates exactly infra/kuberay/rayjob.yaml"

    # Its service account may create RayJobs in the namespace and do nothing else.
    account = pod["serviceAccountName"]
    bindings = [b for b in all_objects() if b["kind"] == "RoleBinding"
                and {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in b["subjects"]]
    assert len(bindings) == 1
    assert bindings[0]["roleRef"]["kind"] == "Role"
    role = one("Role", bindings[0]["roleRef"]["name"])
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]

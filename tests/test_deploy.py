"""Deployment: Dockerfiles and Kubernetes manifests, checked offline, and rehearsed on loopback.

Every overlay in k8s/overlays is rendered with kustomize and checked by kubernetes-validate
(strict, built-in kinds plus the pod templates inside custom resources), the PyTorchJob CRD's own
schema, checkov (once per session) and promtool; the Dockerfiles by hadolint. The cpu-smoke
PyTorchJob's training command is then run as two torchrun "nodes" with the environment the
Kubeflow operator would give its pods, so the manifest and the trainer cannot drift apart.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import jsonschema
import psutil
import pytest
import yaml

from tests.conftest import ROOT, free_port

K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
BIN = Path(sys.executable).parent
# The oldest Kubernetes the manifests target (preStop `sleep` is on by default from 1.30) and the
# newest whose schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# checkov findings skipped on purpose; each skip carries its reason next to it (annotation or comment).
JUSTIFIED_SKIPS = {"CKV_K8S_15", "CKV_K8S_35", "CKV_K8S_43", "CKV_DOCKER_2"}


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found (in {BIN} or on PATH); `uv sync` installs it"
                    + ("; promtool comes with Debian's prometheus package, which .ci/run installs"
                       if name == "promtool" else ""))
    return found


def run(*command: str, timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def kustomize(path: Path) -> str:
    proc = run(tool("kubectl"), "kustomize", str(path))
    assert proc.returncode == 0, f"kustomize {path}: {proc.stderr}"
    return proc.stdout


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def replica_templates(doc: dict) -> dict[str, dict]:
    """The pod templates inside a custom resource, by replica type (Kubernetes validators and
    checkov know nothing of custom resources, so these are handed to them separately)."""
    if doc["kind"] == "PyTorchJob":
        return {kind.lower(): r["template"] for kind, r in doc["spec"]["pytorchReplicaSpecs"].items()}
    return {}


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """Every pod template in the rendered docs, named ``Kind/name[/replica]``."""
    out = {}
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in ("Deployment", "Job"):
            out[f"{kind}/{name}"] = doc["spec"]["template"]
        out |= {f"{kind}/{name}/{replica}": t for replica, t in replica_templates(doc).items()}
    return out


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    return {key: template["spec"] for key, template in pod_templates(docs).items()}


def as_pod_templates(docs: list[dict]) -> list[dict]:
    """Custom resources' pod templates as PodTemplate objects, which kubernetes-validate knows."""
    return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{doc['metadata']['name']}-{replica}"},
             "template": template}
            for doc in docs for replica, template in replica_templates(doc).items()]


def as_jobs(docs: list[dict]) -> list[dict]:
    """The same pod templates as Jobs (run-to-completion pods, which they are) carrying their
    resource's namespace and annotations, where checkov reads its skips."""
    return [{"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {"name": f"{doc['metadata']['name']}-{replica}",
                          **{k: doc["metadata"][k] for k in ("namespace", "annotations") if k in doc["metadata"]}},
             "spec": {"template": template}}
            for doc in docs for replica, template in replica_templates(doc).items()]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {name: [d for d in yaml.safe_load_all(kustomize(K8S / "overlays" / name)) if d] for name in OVERLAYS}


def validate(manifests: dict[str, list[dict]], folder: Path, versions=K8S_VERSIONS) -> list[str]:
    """Strict schema errors of named sets of docs: built-in kinds and custom resources' pod
    templates through kubernetes-validate (one run per Kubernetes version), PyTorchJobs against
    the operator's CRD schema. Empty when all are valid."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, docs in manifests.items():
        paths.append(folder / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump_all(docs + as_pod_templates(docs), sort_keys=False))
    errors = []
    for version in versions:
        proc = run(tool("kubernetes-validate"), "--strict", "--quiet", "--no-warn", "-k", version, *map(str, paths))
        if proc.returncode != 0:
            errors.append(f"kubernetes {version}: {proc.stdout}{proc.stderr}")
    schema = json.loads((K8S / "schemas" / "pytorchjob-kubeflow.org-v1.json").read_text())
    for name, docs in manifests.items():
        errors += [f"{name}: PyTorchJob {'.'.join(map(str, e.path))}: {e.message}"
                   for doc in docs if doc["kind"] == "PyTorchJob"
                   for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    return errors


# --- rendering and schemas -------------------------------------------------------------------


def test_overlays_exist_and_render(rendered):
    assert {"cpu-smoke", "gpu", "gpu-elastic", "gpu-indexed", "cpu-smoke-indexed"} <= set(rendered)
    for name, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
                "PodMonitor", "PrometheusRule", "ConfigMap", "PersistentVolumeClaim"} <= kinds, name
        assert ("PyTorchJob" in kinds) != ("Job" in kinds), f"{name}: one way to train, not {kinds}"
        namespaced = [d for d in docs if d["kind"] != "Namespace"]
        assert {d["metadata"].get("namespace") for d in namespaced} == {one(docs, "Namespace")["metadata"]["name"]}, name


def test_manifests_pass_strict_schemas(rendered, tmp_path):
    assert validate(rendered, tmp_path) == []


def _container(docs: list[dict], key: str) -> dict:
    return pod_specs(docs)[key]["containers"][0]


# Each breaks one rendered doc; validation must name what broke.
MUTATIONS = {
    "unknown field in a container": (
        lambda docs: _container(docs, "Deployment/tandem-serve").update(imagePullPolicyy="Always"),
        "spec.template.spec.containers.0: Additional properties are not allowed ('imagePullPolicyy'"),
    "replicas as a string": (
        lambda docs: one(docs, "Deployment")["spec"].update(replicas="two"),
        "spec.replicas: 'two' is not of type 'integer'"),
    "container without a name": (
        lambda docs: _container(docs, "PyTorchJob/tandem-train/master").pop("name"),
        "podtemplate/tandem-train-master against version 1.30: template.spec.containers.0: 'name' is a required"),
    "unknown field in a PyTorchJob pod": (
        lambda docs: pod_specs(docs)["PyTorchJob/tandem-train/worker"].update(hostNetwrk=True),
        "Additional properties are not allowed ('hostNetwrk' was unexpected)"),
    "unknown field in the PyTorchJob's runPolicy": (
        lambda docs: one(docs, "PyTorchJob")["spec"]["runPolicy"].update(backofLimit=3),
        "spec.runPolicy: Additional properties are not allowed ('backofLimit' was unexpected)"),
    "PyTorchJob replicas as a string": (
        lambda docs: one(docs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="two"),
        "spec.pytorchReplicaSpecs.Worker.replicas: 'two' is not of type 'integer'"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_broken_manifest_fails_validation(rendered, tmp_path, mutation):
    docs = copy.deepcopy(rendered["cpu-smoke"])
    mutate, needle = MUTATIONS[mutation]
    mutate(docs)
    errors = validate({"mutated": docs}, tmp_path, versions=K8S_VERSIONS[:1])
    assert errors and needle in "\n".join(errors), errors


# --- what the pods must be ---------------------------------------------------------------------


def test_every_pod_is_locked_down(rendered):
    for overlay, docs in rendered.items():
        for key, spec in pod_specs(docs).items():
            where = f"{overlay} {key}"
            assert spec["automountServiceAccountToken"] is False, where
            assert spec["serviceAccountName"] != "default", where
            pod_security = spec["securityContext"]
            assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] >= 10000, where
            assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, where
            volumes = {v["name"]: v for v in spec["volumes"]}
            for container in spec["containers"] + spec.get("initContainers", []):
                where = f"{overlay} {key} {container['name']}"
                security = container["securityContext"]
                assert security["allowPrivilegeEscalation"] is False, where
                assert security["readOnlyRootFilesystem"] is True, where
                assert security["capabilities"] == {"drop": ["ALL"]}, where
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(container["resources"][bound]), where
                image = container["image"]
                assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), where
                # A read-only root needs writable scratch space: /tmp, and HOME for the caches.
                mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
                for path in ("/tmp", "/home/tandem"):
                    assert "emptyDir" in mounts.get(path, {}), f"{where}: no emptyDir at {path}"


def test_training_pods(rendered):
    for overlay, docs in rendered.items():
        config_map = one(docs, "ConfigMap")
        run_dir = tomllib.loads(config_map["data"]["train.toml"])["train"]["run_dir"]
        for key, spec in pod_specs(docs).items():
            if "tandem-train" not in key:
                continue
            where = f"{overlay} {key}"
            (container,) = [c for c in spec["containers"] if c["name"] == "pytorch"]
            argv = container["command"] + container["args"]
            assert argv[:3] == ["python", "-m", "training.torchrun"], where
            assert argv[-2:] == ["--resume", "latest"], where
            config_path = Path(argv[argv.index("--config") + 1])
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            assert mounts[str(config_path.parent)]["configMap"]["name"] == config_map["metadata"]["name"], where
            claim = next(path for path, v in mounts.items() if "persistentVolumeClaim" in v)
            assert Path(run_dir).is_relative_to(claim), f"{where}: run_dir {run_dir} is not on the volume at {claim}"
            assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory", where
            env = {e["name"]: e for e in container["env"]}
            assert 30 <= int(env["TANDEM_DIST_TIMEOUT_S"]["value"]) <= 900, where
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= {
                name for name, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}, where
            assert any(p["name"] == "pytorchjob-port" for p in container["ports"]), where
            gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
            assert (gpus > 0) == overlay.startswith("gpu"), where


def test_pytorchjob_replicas(rendered):
    for overlay, docs in rendered.items():
        jobs = [d for d in docs if d["kind"] == "PyTorchJob"]
        for job in jobs:
            spec = job["spec"]
            replicas = spec["pytorchReplicaSpecs"]
            assert spec["runPolicy"]["backoffLimit"] > 0, overlay
            assert {r["restartPolicy"] for r in replicas.values()} == {"OnFailure"}, overlay
            gpus = replicas["Worker"]["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            assert gpus in (None, int(spec["nprocPerNode"])), f"{overlay}: one process per GPU"
            if "elasticPolicy" in spec:
                policy = spec["elasticPolicy"]
                assert set(replicas) == {"Worker"}, overlay
                assert policy["minReplicas"] < policy["maxReplicas"] == replicas["Worker"]["replicas"], overlay
            else:
                assert replicas["Master"]["replicas"] == 1, overlay
                # The overlays shape the Master's pod; every Worker must run the very same pod.
                assert replicas["Worker"]["template"] == replicas["Master"]["template"], overlay


def test_indexed_job_runs_the_pytorchjobs_pod(rendered):
    for overlay, docs in rendered.items():
        if not overlay.endswith("-indexed"):
            continue
        job = one(docs, "Job", "tandem-train")
        service = one(docs, "Service", "tandem-train")
        master = one(rendered[overlay.removesuffix("-indexed")], "PyTorchJob")
        template = copy.deepcopy(job["spec"]["template"])
        spec = template["spec"]
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert job["spec"]["completionMode"] == "Indexed"
        assert int(env["PET_NNODES"]["value"]) == job["spec"]["completions"] == job["spec"]["parallelism"]
        assert env["PET_NPROC_PER_NODE"]["value"] == master["spec"]["nprocPerNode"]
        assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        # Pod 0's DNS name through the headless Service: <job>-0.<subdomain>.
        assert env["PET_MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{spec['subdomain']}"
        assert spec["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
        assert int(env["PET_MASTER_PORT"]["value"]) == service["spec"]["ports"][0]["port"]
        assert service["spec"]["selector"]["batch.kubernetes.io/job-name"] == job["metadata"]["name"]
        assert spec["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] > 0
        assert job["metadata"]["annotations"] == master["metadata"]["annotations"]
        # Apart from the rank wiring, the very pod the PyTorchJob runs.
        spec["containers"][0]["env"] = [e for e in spec["containers"][0]["env"] if not e["name"].startswith("PET_")]
        del spec["restartPolicy"], spec["subdomain"]
        assert template == master["spec"]["pytorchReplicaSpecs"]["Master"]["template"], overlay


def test_serving(rendered):
    for overlay, docs in rendered.items():
        deployment, service = one(docs, "Deployment", "tandem-serve"), one(docs, "Service", "tandem-serve")
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", overlay
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", overlay
        assert container["readinessProbe"]["httpGet"]["port"] in ports, overlay
        assert int(container["args"][container["args"].index("--port") + 1]) == ports["http"], overlay
        labels = pod["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), overlay
        assert service["spec"]["ports"][0]["targetPort"] in ports, overlay
        hpa = one(docs, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tandem-serve"}
        assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"], overlay
        assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items(), overlay
        monitor = one(docs, "ServiceMonitor")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items(), overlay
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}, overlay
        # The model is the training run's export, read from the run volume.
        run_dir = tomllib.loads(one(docs, "ConfigMap")["data"]["train.toml"])["train"]["run_dir"]
        assert container["args"][container["args"].index("--model") + 1] == f"{run_dir}/export", overlay
        assert "--wait-for-model" in container["args"], overlay  # ready once training has exported, not crash-looping


def test_training_metrics_are_scraped(rendered):
    for overlay, docs in rendered.items():
        monitor = one(docs, "PodMonitor", "tandem-train")
        config = tomllib.loads(one(docs, "ConfigMap")["data"]["train.toml"])
        for key, spec in pod_specs(docs).items():
            if "tandem-train" in key:
                ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
                assert ports[monitor["spec"]["podMetricsEndpoints"][0]["port"]] == config["train"]["metrics_port"]
        selector = monitor["spec"]["selector"]["matchLabels"]
        template_labels = next(t["metadata"]["labels"] for k, t in pod_templates(docs).items() if "tandem-train" in k)
        # Labels the operator (or the Job controller) adds to the pods it creates.
        added = {"training.kubeflow.org/replica-type", "batch.kubernetes.io/job-completion-index"}
        assert {k: v for k, v in selector.items() if k not in added}.items() <= template_labels.items(), overlay
        assert len(added & set(selector)) == (0 if "gpu-elastic" == overlay else 1), overlay


# --- linters -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    proc = run(tool("hadolint"), str(dockerfile))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_images_install_only_their_group():
    text = {p.stem: p.read_text() for p in DOCKERFILES}
    assert set(text) == {"train", "serve"}
    for name, other in (("train", "serve"), ("serve", "train")):
        syncs = [line for line in text[name].splitlines() if "uv sync" in line]
        assert syncs and all(f"--frozen --no-default-groups --group {name}" in s and other not in s for s in syncs)
        assert "USER 10001" in text[name]
    assert "HEALTHCHECK" in text["serve"] and "/healthz" in text["serve"]
    assert '"tandem", "serve"' in text["serve"] and '"tandem", "train"' in text["train"]


@pytest.fixture(scope="session")
def checkov_report(rendered, tmp_path_factory) -> list[dict]:
    """One checkov run over every rendered overlay, custom resources' pods and the Dockerfiles."""
    folder = tmp_path_factory.mktemp("checkov")
    for name, docs in rendered.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump_all(docs + as_jobs(docs), sort_keys=False))
    for dockerfile in DOCKERFILES:
        shutil.copy(dockerfile, folder / dockerfile.name)
    proc = run(tool("checkov"), "-d", str(folder), "--framework", "kubernetes", "dockerfile", "--compact",
               "-o", "json", "--skip-download", timeout=300)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    report = report if isinstance(report, list) else [report]
    assert {r["check_type"] for r in report} == {"kubernetes", "dockerfile"}, proc.stdout[:2000]
    return report


def test_checkov_finds_nothing_unjustified(checkov_report):
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
              for r in checkov_report for c in r["results"]["failed_checks"]]
    assert failed == []
    assert all(r["summary"]["parsing_errors"] == 0 for r in checkov_report)
    # The custom resources' pods were scanned (their skips applied), not passed over.
    scanned = {c["resource"] for r in checkov_report for c in r["results"]["skipped_checks"]}
    assert {"Job.tandem.tandem-train-master", "Job.tandem.tandem-train-worker"} <= scanned


def test_checkov_skips_are_few_and_explained(checkov_report):
    skipped = [c for r in checkov_report for c in r["results"]["skipped_checks"]]
    assert {c["check_id"] for c in skipped} <= JUSTIFIED_SKIPS
    reasons = {(c["check_id"], c["resource"]): c["check_result"].get("suppress_comment", "") for c in skipped}
    assert all(len(reason.strip()) > 20 for reason in reasons.values()), reasons


@pytest.fixture(scope="session")
def alert_rules(rendered, tmp_path_factory) -> Path:
    """The PrometheusRule's groups as a plain rules file, beside the promtool unit tests."""
    folder = tmp_path_factory.mktemp("rules")
    rule = one(rendered["gpu"], "PrometheusRule")
    (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    shutil.copy(K8S / "base" / "monitoring" / "alerts_test.yaml", folder / "alerts_test.yaml")
    return folder


def test_promtool_checks_the_alert_rules(alert_rules):
    proc = run(tool("promtool"), "check", "rules", str(alert_rules / "rules.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alerts_fire_when_they_should(alert_rules):
    proc = run(tool("promtool"), "test", "rules", "alerts_test.yaml", cwd=alert_rules)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- rehearsal: the cpu-smoke PyTorchJob as two torchrun "nodes" on loopback --------------------


def toml_dumps(config: dict[str, dict]) -> str:
    """Sections of scalars, all a Tandem config holds."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


class Rehearsal:
    """The cpu-smoke PyTorchJob's pods as local processes: each replica's command and env from the
    rendered manifest, the variables the operator would inject, and its volumes as folders
    (the ConfigMap and the claim shared by both "nodes", emptyDirs per node)."""

    def __init__(self, docs: list[dict], root: Path, synth: Path, **train):
        self.job = one(docs, "PyTorchJob")
        self.docs, self.root = docs, root
        replicas = self.job["spec"]["pytorchReplicaSpecs"]
        # Master is node 0, then the workers: the operator's rank order.
        self.templates = [replicas["Master"]["template"]] * replicas["Master"]["replicas"] + \
                         [replicas["Worker"]["template"]] * replicas["Worker"]["replicas"]
        self.port = free_port()
        self.config = tomllib.loads(self._config_map()["data"]["train.toml"])
        # The ConfigMap's run, pointed at the tiny shards and cut short.
        self.overrides = {
            "data": dict(train_shards=f"{synth}/train/shard-{{00000..00003}}.tar",
                         val_shards=f"{synth}/test/shard-{{00000..00001}}.tar",
                         classes=f"{synth}/classes.json", batch_size=16, shuffle_buffer=64),
            "train": dict(metrics_port=free_port(), **train),
        }
        self.procs: list[subprocess.Popen] = []
        self.envs: dict[int, dict[str, str]] = {}

    def _config_map(self) -> dict:
        return one(self.docs, "ConfigMap")

    def mounts(self, node: int) -> dict[str, Path]:
        spec = self.templates[node]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        out = {}
        for mount in spec["containers"][0]["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                out[mount["mountPath"]] = self.root / f"configmap-{volume['configMap']['name']}"
            elif "persistentVolumeClaim" in volume:
                out[mount["mountPath"]] = self.root / f"pvc-{volume['persistentVolumeClaim']['claimName']}"
            elif volume.get("emptyDir", {}).get("medium") != "Memory":  # /dev/shm is the host's
                out[mount["mountPath"]] = self.root / f"node{node}-{mount['name']}"
        return out

    def remap(self, value: str, node: int) -> str:
        for path, local in sorted(self.mounts(node).items(), key=lambda kv: -len(kv[0])):
            if value == path or value.startswith(path + "/"):
                return str(local) + value[len(path):]
        return value

    def run_dir(self) -> Path:
        return Path(self.remap(self.config["train"]["run_dir"], 0))

    def start(self, node: int) -> subprocess.Popen:
        for path, local in self.mounts(node).items():
            local.mkdir(parents=True, exist_ok=True)
        config = {s: {k: self.remap(v, node) if isinstance(v, str) else v for k, v in values.items()}
                  for s, values in self.config.items()}
        for section, values in self.overrides.items():
            config[section].update(values)
        (self.root / f"configmap-{self._config_map()['metadata']['name']}" / "train.toml").write_text(toml_dumps(config))
        container = self.templates[node]["spec"]["containers"][0]
        argv = [self.remap(part, node) for part in container["command"] + container["args"]]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PET_", "TANDEM_", "MASTER_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        # Plain values as written; optional Secret keys are absent, as with no tandem-s3 Secret.
        env |= {e["name"]: self.remap(e["value"], node) for e in container["env"] if "value" in e}
        nnodes, nproc = len(self.templates), int(self.job["spec"]["nprocPerNode"])
        env |= {  # what the training operator adds to each pod
            "PET_NNODES": str(nnodes), "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(node),
            "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(self.port),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.port),
            "WORLD_SIZE": str(nnodes * nproc), "RANK": str(node), "PYTHONUNBUFFERED": "1",
        }
        # The image's PATH: python from the venv. HOME stays this machine's, where DeepSpeed keeps
        # the CPU kernel it compiles on first use (minutes, once).
        env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
        env["OMP_NUM_THREADS"] = "1"  # two "nodes" share this machine's cores
        self.envs[node] = env
        with (self.root / f"node{node}.log").open("w") as log:  # the child keeps its own copy
            proc = subprocess.Popen(argv, env=env, cwd=self.remap("/home/tandem", node),  # the WORKDIR
                                    stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def log(self, node: int, tail: int = 6000) -> str:
        return (self.root / f"node{node}.log").read_text()[-tail:]

    def signal_tree(self, node: int, sig: int, pause: float = 0.0) -> None:
        """``sig`` to the node's whole process tree: the agent, its ranks, their loader workers.
        (torchrun starts each worker in a session of its own, so its process group is not enough.)"""
        try:
            agent = psutil.Process(self.procs[node].pid)
            tree = [agent, *agent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
                time.sleep(pause)

    def dump_stacks(self, node: int) -> None:
        """Each of the node's processes prints its threads' stacks to the node's log and runs on
        (training.cli.dump_stacks_on_sigusr1): one at a time, as they share the log."""
        self.signal_tree(node, signal.SIGUSR1, pause=1.0)

    def kill(self, node: int) -> None:
        """SIGKILL the node's whole process tree, as a pod's death ends every process in it."""
        self.signal_tree(node, signal.SIGKILL)

    def close(self) -> None:
        for node, proc in enumerate(self.procs):
            self.kill(node)
            proc.wait()


@pytest.fixture
def rehearsal(rendered, synth_data, tmp_path):
    made = []

    def make(**train) -> Rehearsal:
        made.append(Rehearsal(rendered["cpu-smoke"], tmp_path, synth_data, **train))
        return made[-1]
    yield make
    for r in made:
        r.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_train_with_the_manifests_command(rehearsal):
    r = rehearsal(steps=4, checkpoint_every=2)
    nodes = [r.start(node) for node in range(2)]
    codes = [proc.wait(timeout=240) for proc in nodes]
    assert codes == [0, 0], "\n\n".join(r.log(n) for n in range(2))
    run_dir = r.run_dir()
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert "global batch 32" in r.log(0)  # 16 per rank, 2 ranks: one group across the two "nodes"
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step00000004"
    # Each rank of the one ZeRO group wrote its optimizer shard to the shared run volume.
    assert sorted(p.name for p in latest.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (run_dir / "export" / "open_clip_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(500)
@pytest.mark.parametrize("victim", [0, 1], ids=["master dies", "worker dies"])
def test_a_dead_node_stops_the_other_within_a_minute(rehearsal, victim):
    r = rehearsal(steps=100000, checkpoint_every=0, eval_every=0)
    nodes = [r.start(node) for node in range(2)]
    metrics = r.run_dir() / "metrics.jsonl"
    deadline = time.monotonic() + 300  # start-up only: on a loaded 2-core machine it took over 180 s once
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in nodes), "\n\n".join(r.log(n) for n in range(2))
        assert time.monotonic() < deadline, "no training steps within 300 s:\n" + r.log(0)
        time.sleep(0.5)
    r.kill(victim)
    killed_at = time.monotonic()
    survivor = nodes[1 - victim]
    # Past the manifest's collective timeout a hang would end anyway; wait that long, to tell a
    # hang cut short by the timeout from one that never ends.
    timeout = int(r.envs[1 - victim]["TANDEM_DIST_TIMEOUT_S"]) + 30
    try:
        code = survivor.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        r.dump_stacks(1 - victim)  # where it waits, into its log (it once hung here under a loaded CI)
        pytest.fail(f"node {1 - victim} still running {timeout} s after node {victim} died:\n{r.log(1 - victim, 40000)}")
    elapsed = time.monotonic() - killed_at
    print(json.dumps({"victim": victim, "survivor_exit_code": code, "seconds_to_exit": round(elapsed, 1)}))
    assert code != 0 and re.search(r"tandem: error: rank \d+ exited with status \d+; its output is above",
                                   r.log(1 - victim)), r.log(1 - victim)
    assert "ChildFailedError" not in r.log(1 - victim), r.log(1 - victim)  # training.torchrun's one line instead
    assert elapsed < 60, r.log(1 - victim)

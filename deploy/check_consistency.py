"""Cross-file checks no schema can do: the CUDA variant, compose, Kubernetes, nginx and the torch pin agree with the
Dockerfile, and every image that mounts the checkpoints volume can seed it.

usage: python deploy/check_consistency.py   (from the repository root; needs PyYAML). Prints one line per problem
and exits 1 if there is any. Run by deploy/check.sh.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_facts(text: str) -> dict:
    lines = re.sub(r"\\\n", " ", text).splitlines()
    stages, args, users, exposed = [], set(), set(), set()
    arg_defaults: dict[str, str] = {}
    parent: dict[str, str] = {}  # stage -> the stage it starts FROM (when that is a stage)
    copies: dict[str, set[str]] = {}  # stage -> sources it COPYs from the build context
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        op = words[0].upper()
        if op == "FROM" and len(words) >= 4 and words[2].upper() == "AS":
            stages.append(words[3])
            if words[1] in stages:
                parent[words[3]] = words[1]
        elif op == "ARG":
            name, _, default = words[1].partition("=")
            args.add(name)
            if default:
                arg_defaults[name] = default
        elif op == "COPY" and stages:
            sources = [w for w in words[1:-1] if not w.startswith("--")]
            if not any(w.startswith("--from=") for w in words):
                copies.setdefault(stages[-1], set()).update(sources)
        elif op == "USER":
            users.add(words[1])
        elif op == "EXPOSE":
            exposed.update(w.split("/")[0] for w in words[1:])

    def copied(stage: str) -> set[str]:  # what a stage holds from the context, its parent stages' COPYs included
        own = copies.get(stage, set())
        return own | copied(parent[stage]) if stage in parent else own

    return {"stages": stages, "args": args, "arg_defaults": arg_defaults, "users": users, "exposed": exposed,
            "copied": {stage: copied(stage) for stage in stages}}  # fmt: skip


def pins(text: str) -> dict[str, str]:
    """constraints.txt -> {normalised name: version}."""
    found = {}
    for line in text.splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            found[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return found


def main() -> int:
    problems: list[str] = []
    facts = dockerfile_facts((ROOT / "Dockerfile").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]

    # Every image compose builds uses a stage and build arguments the Dockerfile declares (the CUDA variant is
    # only ever built outside, so a renamed ARG would otherwise go unnoticed until someone has a GPU).
    for name, svc in services.items():
        build = svc.get("build")
        if not build:
            continue
        target = build.get("target")
        if target not in facts["stages"]:
            problems.append(f"compose service {name}: build target {target!r} is not a Dockerfile stage")
        for arg in build.get("args", {}):
            if arg not in facts["args"]:
                problems.append(f"compose service {name}: build arg {arg} is not an ARG in the Dockerfile")
    if facts["stages"][-1] != "runtime":
        problems.append(f"the Dockerfile's last stage (the default target) is {facts['stages'][-1]!r}, not 'runtime'")
    gpu = services.get("api-gpu", {})
    gpu_args = gpu.get("build", {}).get("args", {})
    if not {"BASE_IMAGE", "TORCH_INDEX_URL"} <= set(gpu_args):
        problems.append("compose api-gpu must set both BASE_IMAGE and TORCH_INDEX_URL (the CUDA variant)")
    cpu_args = services["api"]["build"].get("args", {})
    if gpu_args.get("TORCH_VERSION") != cpu_args.get("TORCH_VERSION"):
        problems.append("compose api and api-gpu build different TORCH_VERSIONs")
    devices = gpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(d.get("driver") == "nvidia" for d in devices):
        problems.append("compose api-gpu reserves no NVIDIA device")

    # One torch version: the pin a clone installs, the image's default and compose's default.
    torch_pin = pins((ROOT / "constraints.txt").read_text()).get("torch")
    torch_versions = {
        "constraints.txt": torch_pin,
        "Dockerfile ARG TORCH_VERSION": facts["arg_defaults"].get("TORCH_VERSION"),
        "compose api TORCH_VERSION": re.sub(r"^\$\{TORCH_VERSION:-(.*)\}$", r"\1", str(cpu_args.get("TORCH_VERSION"))),
    }
    if len(set(torch_versions.values())) != 1:
        problems.append(f"torch versions differ: {torch_versions}")

    # The checkpoints volume is seeded by whichever service first mounts it, from that service's image: every
    # image mounting it must carry the bundled models, or `api` finds none after a train-first start.
    for name, svc in services.items():
        mounts_checkpoints = any(str(v).startswith("checkpoints:/app/checkpoints") for v in svc.get("volumes", []))
        target = (svc.get("build") or {}).get("target")
        if mounts_checkpoints and "checkpoints" not in facts["copied"].get(target, set()):
            problems.append(f"compose service {name} mounts the checkpoints volume, but its image (stage {target}) "
                            "does not COPY checkpoints: a volume it seeds first would hold no models")  # fmt: skip

    # One port and one non-root uid everywhere.
    uid = next(iter(facts["users"])).split(":")[0] if len(facts["users"]) == 1 else None
    if uid is None or uid in ("0", "root"):
        problems.append(f"the Dockerfile's stages should share one non-root USER, found {sorted(facts['users'])}")
    if facts["exposed"] != {"8000", "8001"}:
        problems.append(f"the Dockerfile should EXPOSE 8000 and 8001 (gRPC), found {sorted(facts['exposed'])}")
    for name in ("api", "api-gpu"):
        ports = services[name].get("ports", [])
        if not any(str(p).endswith(":8000") for p in ports):
            problems.append(f"compose service {name} does not publish container port 8000")

    kustomization = yaml.safe_load((ROOT / "deploy/k8s/kustomization.yaml").read_text())
    docs = {}
    for resource in kustomization["resources"]:
        path = ROOT / "deploy/k8s" / resource
        if not path.is_file():
            problems.append(f"kustomization resource {resource} does not exist")
            continue
        doc = yaml.safe_load(path.read_text())
        docs[doc["kind"]] = doc
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if str(pod["securityContext"].get("runAsUser")) != uid:
        problems.append(f"k8s runAsUser {pod['securityContext'].get('runAsUser')} != Dockerfile USER {uid}")
    if [p["containerPort"] for p in container["ports"]] != [8000, 8001]:
        problems.append("k8s containerPorts should be 8000 (http) and 8001 (grpc, the default VAE_GRPC_PORT)")
    probes = {k: container.get(k, {}).get("httpGet", {}).get("path") for k in ("readinessProbe", "livenessProbe")}
    if probes != {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}:
        problems.append(f"k8s probes should be readiness /readyz and liveness /healthz, found {probes}")
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", docs["Deployment"]["metadata"]["name"]):
        problems.append(f"the HPA scales {target}, not the Deployment")
    if docs["Service"]["spec"]["selector"] != docs["Deployment"]["spec"]["selector"]["matchLabels"]:
        problems.append("the Service's selector does not match the Deployment's pods")

    # The KServe runtime (deploy/k8s/kserve/): its ports are the ones its probes and the gRPC InferenceService use.
    kserve = {}
    for path in sorted((ROOT / "deploy/k8s/kserve").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in ("ServingRuntime", "InferenceService"):
                kserve.setdefault(doc["kind"], []).append(doc)
    runtime = kserve["ServingRuntime"][0]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in runtime["env"]}
    for probe in ("readinessProbe", "livenessProbe"):
        if str(runtime[probe]["httpGet"]["port"]) != env.get("VAE_PORT"):
            problems.append(f"the KServe runtime's {probe} port is not its VAE_PORT {env.get('VAE_PORT')}")
    if str(runtime["securityContext"].get("runAsUser")) != uid:
        problems.append(f"the KServe runtime's runAsUser is not the Dockerfile USER {uid}")
    for service in kserve["InferenceService"]:
        model = service["spec"]["predictor"]["model"]
        ports = [str(p["containerPort"]) for p in model.get("ports", []) if p.get("name") == "h2c"]
        if model.get("protocolVersion") == "grpc-v2" and ports != [env.get("VAE_GRPC_PORT")]:
            problems.append(f"InferenceService {service['metadata']['name']}: h2c port {ports} is not VAE_GRPC_PORT")

    nginx = (ROOT / "deploy/nginx.conf").read_text()
    if "server api-replica:8000" not in nginx or "api-replica" not in services:
        problems.append("deploy/nginx.conf must balance over compose's api-replica service on port 8000")

    for p in problems:
        print(f"consistency: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

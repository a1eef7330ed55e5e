#!/usr/bin/env bash
# Builds the real Dockerfile, runs the image and checks it: readiness, one prediction, /metrics, the non-root user,
# the HEALTHCHECK, thread defaults from a CPU limit and models mounted at /models; with podman, plays
# deploy/kubernetes/deployment.yaml's pod (`podman kube play`: it starts, its probes' endpoints answer, a prediction
# comes back; then `podman kube down`); then, where podman-compose is there, brings up moe-serve and Prometheus from
# docker-compose.yml and checks that Prometheus scrapes it.
# Uses docker when an engine answers, podman otherwise (installed with apt-get if missing). Where no image registry
# can be reached, the base image is made locally (debootstrap) and torch comes from the wheel on this machine's disk;
# the Dockerfile itself stays as every Docker user builds it. Removes the containers it started; the built images
# stay as a cache for the next run (IMAGE_TEST_CLEAN=1 removes them too).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${IMAGE_TAG:-localhost/moe-serve:image-test}
BASE_TAG=localhost/moe-serve-base:bookworm
PROM_TAG=localhost/moe-serve-prometheus:image-test
PROJECT=moe-serve-image-test-$$
CACHE=${IMAGE_TEST_CACHE:-/var/tmp/moe-serve-image-test}
NAME=moe-serve-image-test-$$
WORK=$(mktemp -d)
PIDS=()

log() { printf '[image-test] %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if [ -n "${COMPOSE_UP:-}" ]; then
        $COMPOSE "${COMPOSE_FILES[@]}" down -v >/dev/null 2>&1
        $ENGINE ps -aq --filter "label=io.podman.compose.project=$PROJECT" | xargs -r $ENGINE rm -f >/dev/null 2>&1
        $ENGINE volume rm "${PROJECT}_extra-models" "${PROJECT}_prometheus-data" >/dev/null 2>&1
        $ENGINE network rm "${PROJECT}_default" >/dev/null 2>&1
    fi
    ${ENGINE:-true} rm -f -v "$NAME" >/dev/null 2>&1
    [ -n "${KUBE_FILE:-}" ] && $ENGINE kube down "$KUBE_FILE" >/dev/null 2>&1
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    if [ "${IMAGE_TEST_CLEAN:-0}" = 1 ]; then
        ${ENGINE:-true} rmi -f "$TAG" "$PROM_TAG" >/dev/null 2>&1
        ${ENGINE:-true} image prune -f >/dev/null 2>&1
    fi
    rm -rf "$WORK"
    [ $rc -eq 0 ] && log "PASS in $SECONDS s" || log "FAILED (exit $rc)"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- the engine ---------------------------------------------------------------------------------------------------
pick_engine() {
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        ENGINE=docker BUILD_ARGS=()
        return
    fi
    command -v podman >/dev/null || bash scripts/install-tools.sh --image
    command -v catatonit >/dev/null || [ -x /usr/libexec/podman/catatonit ] || bash scripts/install-tools.sh --image
    ENGINE=podman
    BUILD_ARGS=(--format docker)  # the OCI format has no HEALTHCHECK
    # Inside an unprivileged sandbox podman cannot raise ulimits or set a pids cgroup limit: switch both off, for
    # this script only (CONTAINERS_CONF replaces the system file for the processes started here).
    mkdir -p "$CACHE"
    printf '[containers]\ndefault_ulimits = []\npids_limit = 0\n' > "$CACHE/containers.conf"
    # crun refuses hybrid cgroups (v1 controllers plus a v2 hierarchy that holds some); runc takes them.
    if grep -qs . /sys/fs/cgroup/unified/cgroup.controllers; then
        command -v runc >/dev/null || bash scripts/install-tools.sh --image
        printf '[engine]\nruntime = "runc"\n' >> "$CACHE/containers.conf"
        BUILD_ARGS+=(--runtime runc)  # podman build does not read the engine's runtime
    fi
    export CONTAINERS_CONF="$CACHE/containers.conf"
}

registry_reachable() {
    timeout 30 $ENGINE pull -q docker.io/library/python:3.11-slim >/dev/null 2>&1
}

# --- a base image and a torch index without registries -----------------------------------------------------------
# Debian bookworm (python 3.11) from the Debian mirror apt uses, with this machine's CA bundle (TLS to PyPI may go
# through a proxy with its own CA) and a pip.conf that sends everything the torch index lacks to PyPI.
local_base() {
    if $ENGINE image exists "$BASE_TAG" 2>/dev/null || $ENGINE image inspect "$BASE_TAG" >/dev/null 2>&1; then
        log "local base $BASE_TAG (cached)"
        return
    fi
    command -v debootstrap >/dev/null || bash scripts/install-tools.sh --image
    local root=$CACHE/rootfs mirror t0=$SECONDS
    mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* \
        2>/dev/null | grep -oE 'https?://[^ ]+' | head -1 || true)
    log "debootstrap bookworm from ${mirror:=http://deb.debian.org/debian}"
    rm -rf "$root"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$root" "$mirror" >"$CACHE/debootstrap.log" 2>&1 || fail "debootstrap: see $CACHE/debootstrap.log"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\nextra-index-url = https://pypi.org/simple\n' \
        > "$root/etc/pip.conf"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    local quiet=()
    [ "$ENGINE" = podman ] && quiet=(-q)  # docker import has no -q
    tar -C "$root" -c . | $ENGINE import "${quiet[@]}" --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
    rm -rf "$root"
    log "local base $BASE_TAG made in $((SECONDS - t0)) s"
}

# A one-package simple index (PEP 503) serving the torch wheel pip already uses here (its find-links).
local_torch_index() {
    local wheel dir
    wheel=${TORCH_WHEEL:-$(python3 - <<'EOF'
import configparser, glob, os
paths = ["/etc/pip.conf", "/etc/xdg/pip/pip.conf", os.path.expanduser("~/.config/pip/pip.conf")]
links = os.environ.get("PIP_FIND_LINKS", "").split()
for p in paths:
    c = configparser.ConfigParser(); c.read(p)
    links += c.get("global", "find-links", fallback="").split()
for d in links:
    for w in sorted(glob.glob(os.path.join(d.removeprefix("file://"), "torch-2.13.0*cp311*x86_64.whl"))):
        print(w); raise SystemExit
EOF
)}
    [ -f "$wheel" ] || fail "no torch 2.13.0 cp311 wheel on disk (set TORCH_WHEEL)"
    dir=$WORK/index/torch
    mkdir -p "$dir"
    ln -s "$wheel" "$dir/"
    printf '<a href="%s">%s</a>\n' "$(basename "$wheel")" "$(basename "$wheel")" > "$dir/index.html"
    # A fixed port when free: the port is in a build argument, so a new one each run would defeat the layer cache.
    INDEX_PORT=38471
    python3 -c "import socket; socket.socket().bind(('127.0.0.1', $INDEX_PORT))" 2>/dev/null || INDEX_PORT=$(free_port)
    python3 -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$INDEX_PORT" >/dev/null 2>&1 &
    PIDS+=($!)
    log "torch index http://127.0.0.1:$INDEX_PORT/ serving $(basename "$wheel")"
}

# --- build ----------------------------------------------------------------------------------------------------------
build() {
    local args=("${BUILD_ARGS[@]}" -t "$TAG")
    LOCAL_BASE=0
    if registry_reachable; then
        log "registry reachable: default base image"
    else
        log "no registry: local base image and torch index"
        LOCAL_BASE=1
        local_base
        local_torch_index
        args+=(--network host --build-arg "BASE_IMAGE=$BASE_TAG" --build-arg "TORCH_INDEX=http://127.0.0.1:$INDEX_PORT/")
    fi
    local t0=$SECONDS
    $ENGINE build "${args[@]}" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; fail "build"; }
    local size
    size=$($ENGINE image inspect --format '{{.Size}}' "$TAG")
    log "built $TAG in $((SECONDS - t0)) s, image size $(python3 -c "print(f'{$size / 1e9:.2f} GB')")"
}

# --- run and check --------------------------------------------------------------------------------------------------
wait_ready() {  # url, seconds
    local deadline=$((SECONDS + $2))
    until curl -fs -o /dev/null "$1/v2/health/ready"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 1
    done
}

check_container() {
    local port extra url t0 body
    port=$(free_port)
    url=http://127.0.0.1:$port
    extra=$WORK/extra
    mkdir -p "$extra"
    cp -r models/bbc-news-moe "$extra/mine"  # a model of "your own", mounted at /models
    chmod -R a+rX "$extra"
    # Host networking: a rootful bridge needs iptables rights that a sandbox may not give. --cpus 1 exercises the
    # entry point's thread default; a read-only root (as in deploy/kubernetes) shows the service writes only /tmp.
    $ENGINE run -d --name "$NAME" --network host --cpus 1 --read-only --tmpfs /tmp \
        -e "MOE_PORT=$port" -e MOE_DEFAULT_MODEL=bbc-news-moe \
        -v "$extra:/models:ro" "$TAG" >/dev/null 2>"$WORK/run.log"  # podman: no systemd for health timers here
    t0=$SECONDS
    wait_ready "$url" 180 || { $ENGINE logs "$NAME" 2>&1 | tail -30; fail "not ready in 180 s"; }
    log "ready in $((SECONDS - t0)) s"

    body=$(curl -fsS "$url/v1/classify" -H 'content-type: application/json' \
        -d '{"inputs": "Shares in the bank rose 5% after profits beat forecasts."}')
    python3 -c 'import json,sys; p=json.loads(sys.argv[1])["predictions"][0]; assert p["label"], p; print(p["label"], round(p["score"], 4))' \
        "$body" | sed 's/^/[image-test] prediction: /' >&2 || fail "prediction: $body"

    curl -fsS "$url/v1/models" | grep -q '"mine"' || fail "the model mounted at /models is not served"
    log "served models: $(curl -fsS "$url/v1/models" | python3 -c 'import json,sys; print(sorted(m["name"] for m in json.load(sys.stdin)["models"]))')"
    # Saved first: grep -q stops reading at its match, and curl writing on into the closed pipe fails the pipeline.
    curl -fsS -o "$WORK/metrics.txt" "$url/metrics" || fail "/metrics"
    grep -q '^moe_requests_total{' "$WORK/metrics.txt" || fail "/metrics has no moe_requests_total"

    local uid threads
    uid=$($ENGINE exec "$NAME" id -u)
    [ "$uid" = 10001 ] || fail "runs as uid $uid, not 10001"
    log "user: uid $uid ($($ENGINE exec "$NAME" id -un))"
    threads=$($ENGINE exec "$NAME" sh -c 'tr "\0" "\n" < /proc/1/environ | sed -n "s/^MOE_THREADS=//p"')
    [ "$threads" = 1 ] || fail "MOE_THREADS=$threads under --cpus 1"
    log "MOE_THREADS=$threads under --cpus 1"

    check_healthcheck
}

check_healthcheck() {
    local test
    test=$($ENGINE image inspect --format '{{json .Config.Healthcheck.Test}}' "$TAG")
    [[ "$test" == *health/ready* ]] || fail "no HEALTHCHECK on readiness in the image: $test"
    if [ "$ENGINE" = podman ]; then
        podman healthcheck run "$NAME" || fail "HEALTHCHECK failed"
    else
        local deadline=$((SECONDS + 60))
        until [ "$(docker inspect --format '{{.State.Health.Status}}' "$NAME")" = healthy ]; do
            [ $SECONDS -lt $deadline ] || fail "not healthy"
            sleep 2
        done
    fi
    log "HEALTHCHECK: healthy"
}

# --- Kubernetes: deploy/kubernetes/deployment.yaml's pod under `podman kube play` --------------------------------
# The Deployment as written (security context, read-only root, emptyDir volumes, env from the CPU limit, probes),
# with what this machine needs: the image just built, one replica, and host networking on free ports (a rootful
# bridge needs iptables rights a sandbox may not give): the server's ports come from MOE_PORT / MOE_GRPC_PORT, the
# named ports become those numbers in the probes, and the port list goes (podman would map it, refused on the host
# network). podman runs the pod only:
# the Service, HPA, PDB and the probes' effect on traffic are not run here (tests/integration/test_deploy.py
# validates them against the Kubernetes schemas, tests/unit/test_deploy.py checks that they fit together).
kube_file() {
    local out=$WORK/kube.yml py=/usr/bin/python3
    [ -x "$py" ] || py=python3
    "$py" - "$TAG" "$KUBE_HTTP" "$KUBE_GRPC" "$PWD" "$WORK" > "$out" <<'PY'
import sys, yaml
tag, http, grpc, root = sys.argv[1:5]
d = yaml.safe_load(open(f"{root}/deploy/kubernetes/deployment.yaml"))
d["spec"]["replicas"] = 1
pod = d["spec"]["template"]["spec"]
pod["hostNetwork"] = True
c = pod["containers"][0]
c["image"] = tag
ports = {"http": int(http), "grpc": int(grpc)}
assert {p["name"] for p in c.pop("ports")} == set(ports)  # podman maps declared ports, which host networking refuses
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    c[probe]["httpGet"]["port"] = ports[c[probe]["httpGet"]["port"]]
c["env"] = [e for e in c["env"] if e["name"] not in ("MOE_PORT", "MOE_GRPC_PORT")]
c["env"] += [{"name": "MOE_PORT", "value": http}, {"name": "MOE_GRPC_PORT", "value": grpc}]
print(yaml.safe_dump(d, sort_keys=False))
with open(f"{sys.argv[5]}/kube-probes", "w") as f:  # the paths the probes ask, to check they answer
    f.write(" ".join(sorted({c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")})))
PY
    echo "$out"
}

check_kube() {
    local file url t0 probe body state pod
    KUBE_HTTP=$(free_port) KUBE_GRPC=$(free_port)
    file=$(kube_file)
    KUBE_FILE=$file
    url=http://127.0.0.1:$KUBE_HTTP
    $ENGINE kube play "$file" >"$WORK/kube.log" 2>&1 || { cat "$WORK/kube.log"; fail "podman kube play"; }
    pod=$(awk '/^Pod:/ {getline; print; exit}' "$WORK/kube.log")  # its name varies across podman versions
    [ -n "$pod" ] || { cat "$WORK/kube.log"; fail "kube play: no pod"; }
    t0=$SECONDS
    wait_ready "$url" 180 || { $ENGINE pod logs "$pod" 2>&1 | tail -30; fail "kube: pod not ready in 180 s"; }
    state=$($ENGINE pod inspect --format '{{.State}}' "$pod")
    [ "$state" = Running ] || fail "kube: pod is $state"
    # What the manifest sets, seen inside: its user, MOE_THREADS from the CPU limit (downward API), a read-only root
    local ctr uid threads
    ctr=$($ENGINE pod inspect --format '{{range .Containers}}{{.Name}} {{end}}' "$pod" | tr ' ' '\n' | grep -v infra | head -1)
    uid=$($ENGINE exec "$ctr" id -u)
    threads=$($ENGINE exec "$ctr" sh -c 'echo "$MOE_THREADS"')
    [ "$uid" = 10001 ] && [ "$threads" = 2 ] || fail "kube: uid $uid, MOE_THREADS=$threads (want 10001, 2)"
    $ENGINE exec "$ctr" touch /probe-write 2>/dev/null && fail "kube: the root filesystem is writable"
    # The probes' own endpoints, read from the manifest played
    for probe in $(cat "$WORK/kube-probes"); do
        curl -fsS -o /dev/null "$url$probe" || fail "kube: probe $probe does not answer 200"
    done
    body=$(curl -fsS "$url/v1/classify" -H 'content-type: application/json' \
        -d '{"inputs": "The striker scored twice in the cup final."}') || fail "kube: prediction"
    log "kube play: pod $state, ready in $((SECONDS - t0)) s, uid $uid, MOE_THREADS=$threads, read-only root," \
        "probes ($(cat "$WORK/kube-probes")) answer 200, prediction:" \
        "$(python3 -c 'import json,sys; p=json.loads(sys.argv[1])["predictions"][0]; print(p["label"], round(p["score"], 4))' "$body")"
    check_kube_grpc
    $ENGINE kube down "$file" >/dev/null 2>&1 || fail "kube down"
    KUBE_FILE=""
    log "kube play: torn down"
}

check_kube_grpc() {  # where a Python with tritonclient[grpc] is at hand (the project's venv): one gRPC inference
    local py=${PYTHON:-.venv/bin/python}
    "$py" -c 'import tritonclient.grpc' 2>/dev/null || { log "kube play: gRPC not checked (no tritonclient here)"; return; }
    "$py" - "127.0.0.1:$KUBE_GRPC" <<'PY' | sed 's/^/[image-test] kube play: gRPC ModelInfer: /' >&2 || fail "kube: gRPC"
import sys, numpy as np, tritonclient.grpc as g
c = g.InferenceServerClient(sys.argv[1])
assert c.is_server_ready()
t = g.InferInput("text", [1], "BYTES")
t.set_data_from_numpy(np.array([b"Shares rose after profits beat forecasts."], dtype=object))
print(c.infer("bbc-news-minilm-moe", [t]).as_numpy("label")[0].decode())
PY
}

# --- compose: moe-serve and Prometheus as docker-compose.yml declares them -----------------------------------------
# The compose file as given, with what this machine needs: the image just built, free loopback ports, and (without a
# registry) a Prometheus image made from the local base and Debian's prometheus binary. Grafana has no such source
# here, so it is left out.
compose_file() {
    local out=$WORK/compose.yml py=/usr/bin/python3  # Debian's, which has yaml wherever podman-compose is
    [ -x "$py" ] || py=python3
    "$py" - "$TAG" "$1" "$APP_PORT" "$PROM_PORT" "$PWD" > "$out" <<'PY'
import sys, yaml
tag, prom_image, app_port, prom_port, root = sys.argv[1:]
c = yaml.safe_load(open(f"{root}/docker-compose.yml"))
app, prom = c["services"]["moe-serve"], c["services"]["prometheus"]
app.pop("build")
app.update(image=tag, ports=[f"127.0.0.1:{app_port}:8000"])
prom.update(image=prom_image, ports=[f"127.0.0.1:{prom_port}:9090"])
prom["volumes"] = [v.replace("./", f"{root}/", 1) if v.startswith("./") else v for v in prom["volumes"]]
if prom_image.startswith("localhost/"):  # no wget in the Debian base: the same readiness check in Python
    prom["healthcheck"]["test"] = ["CMD", "python3", "-c",
        "import urllib.request as u; u.urlopen('http://127.0.0.1:9090/-/ready', timeout=2)"]
c["services"] = {"moe-serve": app, "prometheus": prom}
print(yaml.safe_dump(c, sort_keys=False))
PY
    echo "$out"
}

local_prometheus_image() {
    local ctx=$WORK/prometheus-image
    mkdir -p "$ctx"
    cp "$(command -v prometheus)" "$ctx/prometheus"
    printf '%s\n' "FROM $BASE_TAG" "COPY prometheus /bin/prometheus" \
        "RUN mkdir -p /prometheus && chown 65534:65534 /prometheus" "USER 65534" "WORKDIR /prometheus" \
        'ENTRYPOINT ["/bin/prometheus"]' > "$ctx/Containerfile"
    $ENGINE build "${BUILD_ARGS[@]}" -t "$PROM_TAG" "$ctx" >"$WORK/prom-build.log" 2>&1 \
        || { tail -20 "$WORK/prom-build.log"; fail "prometheus image"; }
}

prom_query() {  # PromQL -> the first result's value; nothing while Prometheus or the series is not there yet
    python3 - "http://127.0.0.1:$PROM_PORT/api/v1/query" "$1" <<'PY'
import json, sys, urllib.parse, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "?" + urllib.parse.urlencode({"query": sys.argv[2]}), timeout=5) as r:
        result = json.load(r)["data"]["result"]
    print(result[0]["value"][1] if result else "")
except OSError:
    print("")
PY
}

check_compose() {
    local prom_image=prom/prometheus:v2.53.0 file
    if [ "$ENGINE" = docker ]; then
        COMPOSE="docker compose"
    else
        command -v podman-compose >/dev/null || bash scripts/install-tools.sh --image
        COMPOSE=podman-compose
    fi
    if [ "$LOCAL_BASE" = 1 ]; then
        local_prometheus_image
        prom_image=$PROM_TAG
    fi
    APP_PORT=$(free_port) PROM_PORT=$(free_port)
    file=$(compose_file "$prom_image")
    COMPOSE_FILES=(-p "$PROJECT" -f "$file")
    COMPOSE_UP=1
    $COMPOSE "${COMPOSE_FILES[@]}" up -d >"$WORK/compose.log" 2>&1 || { tail -30 "$WORK/compose.log"; fail "compose up"; }
    wait_ready "http://127.0.0.1:$APP_PORT" 180 || { tail -30 "$WORK/compose.log"; fail "compose: moe-serve not ready"; }
    curl -fsS -o /dev/null "http://127.0.0.1:$APP_PORT/v1/classify" -H 'content-type: application/json' \
        -d '{"inputs": "The striker scored twice."}' || fail "compose: prediction"
    local deadline=$((SECONDS + 60)) up="" requests=""
    until [ "$up" = 1 ] && [ -n "$requests" ]; do
        [ $SECONDS -lt $deadline ] || fail "compose: Prometheus does not scrape moe-serve (up=$up)"
        sleep 2
        up=$(prom_query 'up{job="moe-serve"}')
        requests=$(prom_query 'sum(moe_requests_total{route="/v1/classify"}) > 0')
    done
    local rules
    rules=$(curl -fsS "http://127.0.0.1:$PROM_PORT/api/v1/rules" | python3 -c \
        'import json,sys; print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))')
    log "compose ($COMPOSE): moe-serve and Prometheus up; Prometheus scrapes moe-serve:8000 by service name" \
        "(up=1, classify requests=$requests), $rules alert rules loaded"
}

main() {
    trap cleanup EXIT
    pick_engine
    log "engine: $($ENGINE --version)"
    build
    check_container
    if [ "$ENGINE" = podman ] && [ "${IMAGE_TEST_KUBE:-1}" = 1 ]; then
        check_kube
    fi
    if [ "${IMAGE_TEST_COMPOSE:-1}" = 1 ]; then
        check_compose
    fi
}

main "$@"

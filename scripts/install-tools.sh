#!/usr/bin/env bash
# Installs the Debian tools the test suite and benchmarks use, if missing: prometheus (promtool checks the /metrics
# exposition, the alert rules and their unit tests; the server scrapes a real moe-serve in a test), wrk (light load
# generator), docker-compose (validates docker-compose.yml) and chromium with chromium-driver (the routing explorer's
# browser test drives a headless chromium through selenium). With --image, also what `make image-test` needs:
# podman, podman-compose, runc and the CNI dnsname plugin (daemonless containers, no Docker engine needed), catatonit
# (a pod's pause process, for podman kube play), debootstrap (a local base image) and curl.
set -euo pipefail
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v prometheus >/dev/null || need+=(prometheus)
command -v wrk >/dev/null || need+=(wrk)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ "${1:-}" = --image ]; then
    command -v podman >/dev/null || need+=(podman)
    command -v podman-compose >/dev/null || need+=(podman-compose)
    # name resolution between compose services on podman's CNI networks
    [ -x /usr/lib/cni/dnsname ] || need+=(golang-github-containernetworking-plugin-dnsname)
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v runc >/dev/null || need+=(runc)  # for hosts with hybrid cgroups, which crun refuses
    command -v curl >/dev/null || need+=(curl)
    # the pause process of a pod's infra container, which `podman kube play` builds locally when no registry answers
    command -v catatonit >/dev/null || [ -x /usr/libexec/podman/catatonit ] || need+=(catatonit)
fi
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing ${need[*]} with apt-get" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

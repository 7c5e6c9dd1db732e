#!/usr/bin/env bash
# Build (and with --push, push) both variants of the image under the tags that infra/
# names. The name and version are read from the Dockerfile's labels, the one place
# they are written down, so the tags cannot drift from the manifests (tests/test_infra.py
# checks the manifests against the same labels).
#
#   infra/build-image.sh            # ghcr.io/sttm-pipeline/sttm-pipeline:<version> and :<version>-cpu
#   infra/build-image.sh --push     # ... and push them (docker login to the registry first)
#   REPOSITORY=registry.example.com/me/sttm infra/build-image.sh --push   # your own registry
set -euo pipefail
cd "$(dirname "$0")/.."

label() { sed -n "s/.*$1=\"\([^\"]*\)\".*/\1/p" Dockerfile | head -n 1; }
repository="${REPOSITORY:-$(label io.sttm-pipeline.image.repository)}"
version="$(label org.opencontainers.image.version)"

docker build --build-arg VARIANT=cuda -t "${repository}:${version}" .
docker build --build-arg VARIANT=cpu -t "${repository}:${version}-cpu" .

if [[ "${1:-}" == "--push" ]]; then
  docker push "${repository}:${version}"
  docker push "${repository}:${version}-cpu"
fi
echo "built ${repository}:${version} and ${repository}:${version}-cpu"

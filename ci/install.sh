#!/usr/bin/env bash
# Install the vlm-fsdp workspace, exactly as locked in uv.lock, into an existing Python environment that
# already has its own PyTorch and CUDA stack (the NVIDIA PyTorch container's). The base's torch, Triton,
# Transformer Engine and NVIDIA/CUDA wheels are kept: they are left out of the locked requirements, and
# every package is installed without dependency resolution, so nothing can pull a second torch in.
#
#   bash ci/install.sh                      # into the environment of `python3`
#   PYTHON=/path/to/python bash ci/install.sh
#
# Needs uv (installed with pip into that environment when missing) and, for the locked wheels, the package
# index or uv's cache.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
# The packages the base environment provides and this script must never replace.
keep='^(torch|triton|transformer-engine|nvidia-|cuda-)'

if ! command -v uv >/dev/null 2>&1; then
  "$python" -m pip install --quiet --disable-pip-version-check "uv>=0.9,<1"
  uv=("$python" -m uv)
else
  uv=(uv)
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Every third-party package of the workspace, pinned, for Linux (the lock's markers pick the platform).
"${uv[@]}" export --project "$root" --frozen --no-hashes --no-dev --no-emit-workspace --no-header \
  --format requirements.txt --output-file "$work/locked.txt" >/dev/null
# Requirement lines start at column 0; continuation and comment lines do not name a package.
grep -E '^[A-Za-z0-9]' "$work/locked.txt" | grep -Ev "$keep" >"$work/install.txt"
echo "ci/install.sh: installing $(wc -l <"$work/install.txt") locked packages; keeping the base's:"
grep -E '^[A-Za-z0-9]' "$work/locked.txt" | grep -E "$keep" | sed 's/ *;.*//; s/^/  kept: /'

# --break-system-packages: the container's Python is the system one; inside a virtual environment it is a
# no-op. uv does not read pip's constraint file (/etc/pip/constraint.txt in the NVIDIA images): the lock decides.
"${uv[@]}" pip install --python "$python" --break-system-packages --no-deps --requirement "$work/install.txt"
"${uv[@]}" pip install --python "$python" --break-system-packages --no-deps "$root"/packages/*/

"$python" - <<'PY'
from importlib.metadata import PackageNotFoundError, version

for name in ("vlm-fsdp", "megatron-core", "transformers", "torch", "transformer-engine"):
    try:
        print(f"ci/install.sh: {name} {version(name)}")
    except PackageNotFoundError:
        print(f"ci/install.sh: {name} not installed")
PY

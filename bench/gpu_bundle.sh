#!/bin/bash
# Prepare the tree and the packages that bench/gpu.py needs on the lent GPU machine (`device` tool), which
# has torch, transformers and numpy for its own Python (3.12 when last seen) but not our other dependencies,
# and no network. Writes .gpu/ (the committed tree plus site.tar.xz, under 64 MiB so the `run` tool can
# carry it); /.gpu/ is git-ignored through .git/info/exclude.
#
#   bash bench/gpu_bundle.sh            # then, through the device tool (carry [".gpu"]):
#   mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site &&
#     cd .gpu && timeout 400 python3 bench/gpu.py --profile &&
#     timeout 300 python3 bench/writer_throughput.py --workers 8 --rows 256
#
# PY (default 3.12) is the device's Python; PACKAGES the ones it lacks (pinned from constraints.txt;
# pyarrow, 78 MiB with the rest, is left out: the device had it when last seen). nnsight 0.8 imports greenlet,
# pydantic, httpx and zstandard and soundfile needs cffi: the device of 2026-11-27 15:00 had none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PY:-3.12}
packages=${PACKAGES:-"nnsight duckdb deltalake arro3-core Deprecated wrapt cloudpickle soundfile cffi pycparser accelerate click rich
  greenlet zstandard pydantic pydantic_core annotated-types typing-inspection typing_extensions httpx httpcore anyio sniffio h11
  certifi idna websocket-client"}
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir .gpu && git archive HEAD | tar -x -C .gpu
# bench/writer_throughput.py's "before" writer and its "lists" buffer (no .git there)
for option in base lists-base; do
  base=$(sed -n "s/.*\"--$option\", default=\"\([0-9a-f]*\)\".*/\1/p" bench/writer_throughput.py)
  mkdir -p ".gpu/bench/base/$base"
  for name in buffer files commits; do git show "$base:store/$name.py" > ".gpu/bench/base/$base/$name.py"; done
done
work=$(mktemp -d)
pins=()
for name in $packages; do
  pins+=("$(grep -i -E "^${name//-/[-_]}==" constraints.txt)")
done
python3 -m pip download -q --disable-pip-version-check --only-binary=:all: --no-deps --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$work/wheels" "${pins[@]}"
python3 -m pip install -q --no-deps --no-compile --target "$work/site" "$work"/wheels/*.whl \
  --python-version "$py" --only-binary=:all: --implementation cp
find "$work/site" -name '__pycache__' -prune -exec rm -rf {} +
rm -rf "$work/site/bin"
XZ_OPT=-6 tar -cJf .gpu/site.tar.xz -C "$work/site" .
rm -rf "$work"
du -h .gpu/site.tar.xz
size=$(stat -c %s .gpu/site.tar.xz)
if [ "$size" -gt $((60 * 2**20)) ]; then
  echo "site.tar.xz is over 60 MiB: drop packages the device already has (PACKAGES=...)" >&2
  exit 1
fi

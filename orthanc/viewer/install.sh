#!/usr/bin/env bash
# Fetches the prebuilt OHIF viewer (the npm package @ohif/app, its dist/ folder) into
# var/viewer/ohif-<version>/ (gitignored). Only the package itself is fetched (npm pack), not its
# dependencies: dist/ is self-contained. npm checks the tarball against the registry's integrity;
# we also check it against the pinned one below, so a changed release is noticed.
#
#   orthanc/viewer/install.sh [--dest DIR]     # prints the dist folder
set -euo pipefail

OHIF_VERSION=3.13.2
OHIF_INTEGRITY=sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dest=$here/../../var/viewer
if [ $# -eq 2 ] && [ "$1" = --dest ]; then
  dest=$2
elif [ $# -ne 0 ]; then
  sed -n '7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,3\}//' >&2
  exit 2
fi

target=$dest/ohif-$OHIF_VERSION
if [ -f "$target/dist/index.html" ]; then
  (cd "$target/dist" && pwd)
  exit 0
fi
command -v npm >/dev/null || { echo "install.sh: npm is needed (Node.js 20: apt-get install nodejs npm)" >&2; exit 2; }

mkdir -p "$dest"
work=$(mktemp -d "$dest/.fetch-XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent --json "@ohif/app@$OHIF_VERSION" > pack.json)
integrity=$(sed -n 's/.*"integrity": *"\([^"]*\)".*/\1/p' "$work/pack.json" | head -n1)
if [ "$integrity" != "$OHIF_INTEGRITY" ]; then
  echo "install.sh: @ohif/app@$OHIF_VERSION has integrity $integrity, expected $OHIF_INTEGRITY" >&2
  exit 1
fi
tar -xzf "$work"/ohif-app-"$OHIF_VERSION".tgz -C "$work"
rm -rf "$target"
mkdir -p "$target"
mv "$work/package/dist" "$work/package/README.md" "$target/"
(cd "$target/dist" && pwd)

#!/usr/bin/env bash
# Runs a local Orthanc as the hospital PACS of a test bench: writes DIR/orthanc.json from
# orthanc/orthanc.json.in and execs Orthanc with it (never the Debian package's /etc/orthanc).
#
#   orthanc/start.sh --dir DIR [--dicom-port 4242] [--http-port 8042] [--aet ORTHANC]
#                    [--node AET@HOST:PORT] [--stable-age SECONDS]
#
# --node registers the CAD node as the DICOM modality "cad-node"; autoforward.lua sends each
# stable study's CT series to it once. See orthanc/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  sed -n '5,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,3\}//' >&2
  exit 2
}

dir=""
dicom_port=4242
http_port=8042
aet=ORTHANC
node=CADNODE@127.0.0.1:11112
stable_age=60

while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || usage
  case "$1" in
    --dir) dir=$2 ;;
    --dicom-port) dicom_port=$2 ;;
    --http-port) http_port=$2 ;;
    --aet) aet=$2 ;;
    --node) node=$2 ;;
    --stable-age) stable_age=$2 ;;
    *) usage ;;
  esac
  shift 2
done
[ -n "$dir" ] || usage

fail() { echo "start.sh: $*" >&2; exit 2; }
is_port() { [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }
is_aet() { [[ $1 =~ ^[A-Za-z0-9_.-]{1,16}$ ]]; }

is_port "$dicom_port" || fail "bad --dicom-port: $dicom_port"
is_port "$http_port" || fail "bad --http-port: $http_port"
is_aet "$aet" || fail "bad --aet (1 to 16 of A-Z a-z 0-9 _ . -): $aet"
[[ $stable_age =~ ^[0-9]+$ ]] && [ "$stable_age" -ge 1 ] || fail "bad --stable-age: $stable_age"
[[ $node =~ ^([^@]+)@([A-Za-z0-9_.:-]+):([0-9]+)$ ]] || fail "bad --node (AET@HOST:PORT): $node"
node_aet=${BASH_REMATCH[1]}
node_host=${BASH_REMATCH[2]}
node_port=${BASH_REMATCH[3]}
is_aet "$node_aet" || fail "bad node AE title: $node_aet"
is_port "$node_port" || fail "bad node port: $node_port"

command -v Orthanc >/dev/null || fail "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# The folder name goes into a JSON string and a sed replacement: keep it to plain characters.
plain_path() { [[ $1 =~ ^[A-Za-z0-9_./+-]+$ ]]; }
plain_path "$dir" || fail "--dir must be a path of plain characters: $dir"
plain_path "$here" || fail "orthanc/ must be in a path of plain characters: $here"
mkdir -p "$dir/storage" "$dir/index"

# The DICOMweb plugin of the Debian package orthanc-dicomweb; ORTHANC_DICOMWEB_PLUGIN overrides.
plugin=${ORTHANC_DICOMWEB_PLUGIN:-}
if [ -z "$plugin" ]; then
  plugin=$(dpkg -L orthanc-dicomweb 2>/dev/null | grep -m1 '/libOrthancDicomWeb\.so$' || true)
fi
[ -n "$plugin" ] || plugin=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
if [ -f "$plugin" ]; then
  plugins="\"$plugin\""
else
  echo "start.sh: warning: DICOMweb plugin not found ($plugin); running without /dicom-web" >&2
  plugins=""
fi

sed -e "s|@DIR@|$dir|g" \
    -e "s|@DICOM_PORT@|$dicom_port|g" \
    -e "s|@HTTP_PORT@|$http_port|g" \
    -e "s|@AET@|$aet|g" \
    -e "s|@NODE_AET@|$node_aet|g" \
    -e "s|@NODE_HOST@|$node_host|g" \
    -e "s|@NODE_PORT@|$node_port|g" \
    -e "s|@STABLE_AGE@|$stable_age|g" \
    -e "s|@LUA@|$here/autoforward.lua|g" \
    -e "s|@PLUGINS@|$plugins|g" \
    "$here/orthanc.json.in" > "$dir/orthanc.json"

# dcmtk (inside Orthanc) is very slow on loopback without TCP_NODELAY (handbook, section 5).
export TCP_NODELAY=1
exec Orthanc "$dir/orthanc.json"

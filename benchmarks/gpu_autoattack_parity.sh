#!/usr/bin/env bash
# Our AutoAttack against torchattacks' on full-width ResNet-18-CAS and WRN-34-10-CAS, on a GPU:
# each network is trained AT+CAS for a few epochs on the real subset, then both AutoAttacks
# (official budgets) attack the same weights and test images; verdicts, agreement and images/s
# land in OUT_DIR/autoattack_parity_<model>.{json,md}.
#
#   bash benchmarks/gpu_autoattack_parity.sh CIFAR_DIR OUT_DIR
#
# Environment: MODELS ("resnet18 wrn34_10"), EPOCHS (2), R18_IMAGES (256), WRN_IMAGES (128),
# REPORT_IMAGES (1000, the default report's cost: OUT_DIR/report_cost_<model>.json),
# CONFIG_FLAGS (extra --config.* for training and attacks), PARITY_FLAGS (extra flags of
# autoattack_parity.py), WORK (/tmp/parity_work). Ours runs 2 seeds (the first one compiles),
# torchattacks 1; the merged report gives each side's images/s. Needs torch and torchattacks.
#
# On a lent H200 (JAX, flax, optax, orbax, chex and torch are there), prepare here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     ml_collections==1.1.0 torchattacks==3.5.1 tensorboardX==2.6.5
#   mkdir -p .data && cp -r ../shared/data/cifar-10-batches-py .data/
# then run, carrying .whl and .data (timeout ~600 s; sizes above are guesses, never run there):
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     PYTHONPATH=/tmp/site bash benchmarks/gpu_autoattack_parity.sh .data/cifar-10-batches-py $OUT
set -euo pipefail
cifar=$1
out=$2
work=${WORK:-/tmp/parity_work}
epochs=${EPOCHS:-2}
python=${PYTHON:-python3}
mkdir -p "$out" "$work"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch shares the GPU with JAX in one process
for model in ${MODELS:-resnet18 wrn34_10}; do
  config=configs/cifar10_at_cas.py
  images=${R18_IMAGES:-256}
  if [ "$model" = wrn34_10 ]; then
    config=configs/wrn34_10_at_cas.py
    images=${WRN_IMAGES:-128}
  fi
  # shellcheck disable=SC2086  # CONFIG_FLAGS / PARITY_FLAGS are lists of flags
  common=(--config="$config" --config.data.source=cifar_dir --config.data.cifar_dir="$cifar"
          ${CONFIG_FLAGS:-})
  start=$(date +%s)
  "$python" main.py "${common[@]}" --workdir="$work/$model" --config.schedule.num_epochs="$epochs" \
    --config.schedule.milestones="($epochs,)" --config.eval.num_images=256
  echo "$model: trained in $(( $(date +%s) - start )) s"
  # shellcheck disable=SC2086
  parity=("$python" -m benchmarks.autoattack_parity "${common[@]}" --checkpoint="$work/$model"
          --images="$images" ${PARITY_FLAGS:-})
  "${parity[@]}" --sides=ours --seeds=2 --out="$work/${model}_ours.json"
  "${parity[@]}" --sides=reference --seeds=1 --out="$work/${model}_reference.json"
  "$python" -m benchmarks.autoattack_parity --merge="$work/${model}_ours.json,$work/${model}_reference.json" \
    --out="$out/autoattack_parity_$model.json" | tee "$out/autoattack_parity_$model.md"
  # The default report (pgd20, cw, aa, aa-joint) on REPORT_IMAGES real test images: model rows
  # and images/s per stage, after one compiling run.
  "$python" -m benchmarks.evaluate "${common[@]}" --checkpoint="$work/$model" --data=config \
    --images="${REPORT_IMAGES:-1000}" --attacks=default --out="$out/report_cost_$model.json"
done

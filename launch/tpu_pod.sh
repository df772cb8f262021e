#!/usr/bin/env bash
# Installs and runs jaxdet on every worker of a Cloud TPU VM (one host or a pod slice).
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --workdir gs://BUCKET/RUN [options] -- ARGS...
#
# 1. install: puts jaxdet into REMOTE_DIR on every worker (a git checkout of --repo at
#    --ref, or a copy of this working tree when no --repo is given) and runs
#    `pip install -e .[tpu]` there;
# 2. run: starts `python3 -m jaxdet.main ARGS --workdir=WORKDIR` on all workers at once
#    (gcloud compute tpus tpu-vm ssh --worker=all) with JAXDET_DISTRIBUTED=auto, so that
#    jax.distributed.initialize() finds the other workers from the TPU VM metadata.
#
# Options (the environment variable in brackets gives the default):
#   --tpu NAME          TPU VM name [TPU_NAME]; required
#   --zone ZONE         its zone [ZONE]; required
#   --project ID        its project [PROJECT]; default: gcloud's configured project
#   --workdir gs://...  checkpoints, metrics, TensorBoard [WORKDIR]; required to run. All
#                       workers write into it, so it must be shared: a gs:// path.
#   --repo URL          git repository to clone on the workers [JAXDET_REPO];
#                       default: copy this working tree (files git does not ignore)
#   --ref REF           branch, tag or commit of --repo [JAXDET_REF]; default: main
#   --remote-dir DIR    jaxdet's directory on the workers, relative to the home directory
#                       or absolute [REMOTE_DIR]; default: jaxdet
#   --skip-install      run only (the same version is installed already)
#   --install-only      install only
#   --detach            start the run under nohup and return; on each worker the log is
#                       REMOTE_DIR/logs/run.log and the process id REMOTE_DIR/logs/run.pid
#   --dry-run           print the gcloud commands instead of running them
#   -h, --help          this text
#
# Example (SpineNet-49 on COCO prepared with `tfds build coco/2017` into a bucket):
#   launch/tpu_pod.sh --tpu my-v4-32 --zone us-central2-b --workdir gs://my-bucket/sn49 \
#     -- --config=configs/spinenet49.py --config.data.data_dir=gs://my-bucket/tfds

set -euo pipefail

usage() {
  sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

tpu=${TPU_NAME:-}
zone=${ZONE:-}
project=${PROJECT:-}
workdir=${WORKDIR:-}
repo=${JAXDET_REPO:-}
ref=${JAXDET_REF:-main}
remote_dir=${REMOTE_DIR:-jaxdet}
install=1
run=1
detach=0
dry_run=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu=${2:?--tpu needs a value}; shift 2 ;;
    --zone) zone=${2:?--zone needs a value}; shift 2 ;;
    --project) project=${2:?--project needs a value}; shift 2 ;;
    --workdir) workdir=${2:?--workdir needs a value}; shift 2 ;;
    --repo) repo=${2:?--repo needs a value}; shift 2 ;;
    --ref) ref=${2:?--ref needs a value}; shift 2 ;;
    --remote-dir) remote_dir=${2:?--remote-dir needs a value}; shift 2 ;;
    --skip-install) install=0; shift ;;
    --install-only) run=0; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (jaxdet.main's flags go after --; see --help)" ;;
  esac
done

[[ -n "$tpu" ]] || die "--tpu (or TPU_NAME) is required"
[[ -n "$zone" ]] || die "--zone (or ZONE) is required"
if ((run)); then
  [[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// path that every worker can write"
  for arg in "$@"; do
    [[ "$arg" == --workdir=* || "$arg" == --workdir ]] &&
      die "give the workdir as --workdir before --, not as a jaxdet.main flag"
  done
fi

# Everything that runs on the workers is one string for their login shell: quote each value.
q() { printf '%q' "$1"; }
rdir=$(q "$remote_dir")

gcloud_tpu() {
  local cmd=(gcloud compute tpus tpu-vm "$@" "--zone=$zone")
  [[ -n "$project" ]] && cmd+=("--project=$project")
  if ((dry_run)); then
    printf '%q ' "${cmd[@]}"
    echo
  else
    "${cmd[@]}"
  fi
}

on_all_workers() {
  gcloud_tpu ssh "$tpu" --worker=all "--command=$1"
}

install_jaxdet() {
  if [[ -n "$repo" ]]; then
    echo "tpu_pod.sh: checking out $repo at $ref on every worker of $tpu" >&2
    on_all_workers "set -euo pipefail
      if [[ ! -d $rdir/.git ]]; then git clone --quiet $(q "$repo") $rdir; fi
      git -C $rdir fetch --quiet origin $(q "$ref")
      git -C $rdir checkout --quiet --detach FETCH_HEAD"
  else
    local root tarball
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    tarball=$(mktemp -d)/jaxdet_src.tar.gz
    echo "tpu_pod.sh: copying $root to every worker of $tpu" >&2
    if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
      # Tracked and untracked files, without what .gitignore excludes (runs, envs, caches).
      (cd "$root" && git ls-files -z --cached --others --exclude-standard |
        tar --null -T - -czf "$tarball")
    else
      tar -C "$root" --exclude=.git -czf "$tarball" .
    fi
    gcloud_tpu scp "$tarball" "$tpu:jaxdet_src.tar.gz" --worker=all
    on_all_workers "set -euo pipefail
      rm -rf $rdir.new && mkdir -p $rdir.new
      tar -xzf ~/jaxdet_src.tar.gz -C $rdir.new && rm ~/jaxdet_src.tar.gz
      rm -rf $rdir && mv $rdir.new $rdir"
    rm -f "$tarball"
  fi
  echo "tpu_pod.sh: pip install -e .[tpu] on every worker" >&2
  # jax[tpu] pulls libtpu; older jax releases find it only through the libtpu index.
  on_all_workers "set -euo pipefail
    cd $rdir
    python3 -m pip install --quiet --upgrade pip
    python3 -m pip install --quiet -e '.[tpu]' \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
}

run_jaxdet() {
  local args="" arg command
  for arg in "$@"; do args+=" $(q "$arg")"; done
  command="JAXDET_DISTRIBUTED=auto python3 -m jaxdet.main$args --workdir=$(q "$workdir")"
  if ((detach)); then
    echo "tpu_pod.sh: starting on every worker; logs in $remote_dir/logs/run.log" >&2
    on_all_workers "set -euo pipefail
      cd $rdir && mkdir -p logs
      nohup env $command > logs/run.log 2>&1 < /dev/null &
      echo \$! > logs/run.pid"
  else
    echo "tpu_pod.sh: running on every worker of $tpu" >&2
    on_all_workers "cd $rdir && $command"
  fi
}

if ((install)); then install_jaxdet; fi
if ((run)); then run_jaxdet "$@"; fi

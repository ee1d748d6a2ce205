# shellcheck shell=bash
# Helpers shared by the launchers (sourced, never run). The caller sets LAUNCHER to its own name.
#
# Every launcher goes through `run`, so DRY_RUN=1 prints exactly the commands a real run executes,
# one line each, prefixed with the host that runs it ("[local]", "[node 1]", "[every worker]").
# Lines starting with '#' are notes. A real run echoes each command to stderr before running it.

case "${DRY_RUN:-0}" in
  0 | 1) ;;
  *) echo "${LAUNCHER}: DRY_RUN must be 0 or 1, got '${DRY_RUN}'" >&2; exit 2 ;;
esac

# One line on stderr naming what is wrong, exit status 2.
die() {
  echo "${LAUNCHER}: $*" >&2
  exit 2
}

# need VAR "what it is": stops with one line when VAR is unset or empty.
need() {
  [[ -n "${!1:-}" ]] || die "$1 is not set: $2"
}

dry_run() {
  [[ "${DRY_RUN:-0}" == 1 ]]
}

# A word quoted for bash (and any POSIX shell) only where it needs it.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Words joined into one command line, each quoted as needed.
join_quoted() {
  local word line=''
  for word in "$@"; do
    line+="${line:+ }$(quote "$word")"
  done
  printf '%s' "$line"
}

# show WHERE CMD...: the command line as it runs on WHERE.
show() {
  local where=$1
  shift
  printf '[%s] %s\n' "$where" "$(join_quoted "$@")"
}

# run WHERE CMD...: prints the command under DRY_RUN=1; otherwise logs it to stderr and runs it.
run() {
  if dry_run; then
    show "$@"
  else
    show "$@" >&2
    shift
    "$@"
  fi
}

# run_last WHERE CMD...: like run, but the command replaces the launcher's shell, so a SIGTERM sent
# to the launcher (preemption, a scheduler's time limit) reaches the training process itself.
run_last() {
  if dry_run; then
    show "$@"
  else
    show "$@" >&2
    shift
    exec "$@"
  fi
}

# A local path made absolute (against the caller's directory); URLs such as gs://... unchanged.
absolute() {
  case "$1" in
    /* | *://*) printf '%s' "$1" ;;
    *) printf '%s' "$PWD/$1" ;;
  esac
}

# The launcher sets --config and --workdir itself (from CONFIG and WORKDIR); a second copy in the
# pass-through flags would silently win, so it is refused.
check_flags() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --config | --config=* | --workdir | --workdir=*)
        die "pass CONFIG=... and WORKDIR=... instead of '$arg' (the launcher sets both)" ;;
      --*) ;;
      *) die "unexpected argument '$arg': only --flag=value arguments go to mirnet_jax.main" ;;
    esac
  done
}

# XLA_FLAGS for GPU runs: the caller's, plus the latency-hiding scheduler (lets XLA overlap the
# gradient all-reduce with compute; JAX "GPU performance tips") unless the caller chose a value.
gpu_xla_flags() {
  local flags=${XLA_FLAGS:-}
  if [[ $flags != *xla_gpu_enable_latency_hiding_scheduler* ]]; then
    flags+="${flags:+ }--xla_gpu_enable_latency_hiding_scheduler=true"
  fi
  printf '%s' "$flags"
}

# The pip extra that installs jax for this GPU (pyproject.toml [project.optional-dependencies]).
cuda_extra() {
  case "${CUDA:-cuda13}" in
    cuda12 | cuda13) printf '%s' "${CUDA:-cuda13}" ;;
    *) die "CUDA must be cuda12 or cuda13 (the pyproject extras), got '${CUDA}'" ;;
  esac
}

# A positive integer, or a one-line error naming the variable.
positive_int() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

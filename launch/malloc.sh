# Sourced by launch/local.sh and launch/slurm/train.sbatch: preload tcmalloc into CPU runs.
# glibc malloc gives every large tensor fresh pages, and DeepSpeed's ZeRO optimizers allocate several
# model-sized buffers per step: tcmalloc reuses them (docs/deepspeed_cpu.md, "The CPU allocator").
#   BLADE_MALLOC=auto      (default) tcmalloc on CPU runs when installed, glibc otherwise and on GPUs
#   BLADE_MALLOC=tcmalloc  tcmalloc also on GPU runs; an error if it is not installed
#   BLADE_MALLOC=system    glibc malloc
# Debian/Ubuntu: apt-get install libtcmalloc-minimal4 (tools/install.sh does it when run as root).
blade_find_tcmalloc() {
  local dir
  for dir in $(ldconfig -p 2>/dev/null | awk '/libtcmalloc_minimal\.so\.4 /{print $NF}' | xargs -r -n1 dirname) \
             /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
    [ -e "$dir/libtcmalloc_minimal.so.4" ] && { echo "$dir/libtcmalloc_minimal.so.4"; return 0; }
  done
  return 1
}

# blade_preload_malloc DEVICE (cpu or cuda): export LD_PRELOAD for the ranks per BLADE_MALLOC.
blade_preload_malloc() {
  local want=${BLADE_MALLOC:-auto} lib
  case "$want" in
    system) return 0 ;;
    auto) [ "$1" = cpu ] || return 0 ;;
    tcmalloc) ;;
    *) echo "blade: BLADE_MALLOC=$want is not one of auto, tcmalloc, system" >&2; return 2 ;;
  esac
  case ":${LD_PRELOAD:-}:" in *libtcmalloc*|*libjemalloc*) return 0 ;; esac   # the user chose one already
  if ! lib=$(blade_find_tcmalloc); then
    if [ "$want" = tcmalloc ]; then
      echo "blade: BLADE_MALLOC=tcmalloc but libtcmalloc_minimal.so.4 is not installed:" \
           "apt-get install libtcmalloc-minimal4, or set BLADE_MALLOC=system" >&2
      return 2
    fi
    echo "blade: note: CPU run on glibc malloc; installing libtcmalloc-minimal4 makes DeepSpeed's steps" \
         "faster (docs/deepspeed_cpu.md, \"The CPU allocator\"; BLADE_MALLOC=system hides this note)" >&2
    return 0
  fi
  export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
}

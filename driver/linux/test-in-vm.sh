#!/usr/bin/env bash
# Build the inferos module against Debian's linux-headers-amd64, boot Debian's
# linux-image-amd64 in QEMU with an initramfs holding busybox, inferos.ko and the static test
# program tests/vmtest.c, run every test inside the VM and print TAP on stdout.
#
#   sudo driver/linux/test-in-vm.sh [--config base|debug|all] [--bench-json FILE] [--no-install-test]
#                                   [--guest-script FILE.py]
#
# In config 'base' the guest also mounts the host's root read-only over 9p and, chrooted into
# it, runs tests/vm_pyclient.py (the Python client against the module) and, on a tmpfs overlay,
# `inferos driver install --no-dkms` / `status` / `uninstall` (skip with --no-install-test);
# --guest-script runs one more Python file there (a benchmark: its "# bench" lines go to JSON).
#
# Configs (each one boot):
#   base   the kernel as shipped
#   debug  debugging aids that need no kernel rebuild: slub_debug=FZPU page_poison=1
#          init_on_free=1 panic_on_warn=1 (+ kmemleak=on if the kernel has it); aids that
#          need a rebuild (KASAN, KFENCE, kmemleak, lockdep, ...) are reported as unavailable
#
# The run fails (exit 1, "not ok" lines) on any failed guest test or on any kernel
# WARNING / BUG / Oops / panic / leak / slab corruption message in the guest's log.
# Needs root the first time (apt-get install); .deb downloads and builds are cached in
# ${INFEROS_DRIVER_CACHE:-~/.cache/inferos-driver}.  Progress goes to stderr, logs of the
# last run to $CACHE/runs/last/.
# Environment: INFEROS_VM_ACCEL=kvm|tcg (default: KVM when it works, else TCG),
#              INFEROS_VM_TIMEOUT seconds per boot (default 420),
#              INFEROS_VM_PYTHON interpreter for the in-VM client test (default .venv/bin/python).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${INFEROS_DRIVER_CACHE:-$HOME/.cache/inferos-driver}"
CONFIGS="base debug"
BENCH_JSON=""
INSTALL_TEST=1
GUEST_SCRIPT=""
TIMEOUT="${INFEROS_VM_TIMEOUT:-420}"
POOL_BYTES=$((256 * 1024 * 1024))
MEM_MB=768
SMP=2
PKGS=(linux-image-amd64 linux-headers-amd64 qemu-system-x86 busybox-static gcc make libc6-dev cpio)

while [ $# -gt 0 ]; do
  case "$1" in
    --config) case "$2" in all) CONFIGS="base debug" ;; base|debug) CONFIGS="$2" ;;
                *) echo "--config must be base, debug or all (got '$2')" >&2; exit 2 ;; esac
              shift 2 ;;
    --bench-json) BENCH_JSON="$2"; shift 2 ;;
    --no-install-test) INSTALL_TEST=0; shift ;;
    --guest-script) GUEST_SCRIPT="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

log() { echo ">> $*" >&2; }
bail() { echo "TAP version 13"; echo "1..0"; echo "Bail out! $*"; exit 1; }

# ---------------------------------------------------------------- packages
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || bail "needs root to install: ${missing[*]}"
  command -v apt-get >/dev/null || bail "apt-get not found; install ${missing[*]} by hand"
  log "installing Debian packages: ${missing[*]} (downloads cached in $CACHE/apt)"
  mkdir -p "$CACHE/apt/archives/partial"
  APT_OPTS=(-o "Dir::Cache::archives=$CACHE/apt/archives" -o APT::Sandbox::User=root)
  apt-get "${APT_OPTS[@]}" update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends \
    "${missing[@]}" >&2
fi

# the newest kernel that has both an image and headers
KVER=""
for k in $(ls /lib/modules 2>/dev/null | sort -V -r); do
  if [ -r "/boot/vmlinuz-$k" ] && [ -d "/lib/modules/$k/build" ]; then KVER="$k"; break; fi
done
[ -n "$KVER" ] || bail "no kernel with both /boot/vmlinuz-* (readable) and /lib/modules/*/build"
KCONFIG="/boot/config-$KVER"

# ---------------------------------------------------------------- build
BUILD="$CACHE/build/$KVER"
RUN="$CACHE/runs/last"
mkdir -p "$BUILD" "$RUN"
rm -rf "${RUN:?}"; mkdir -p "$RUN"
cp -p "$HERE/Makefile" "$HERE/inferos_main.c" "$HERE/inferos_ioctl.h" "$BUILD/"
log "building inferos.ko against $KVER headers"
BUILD_OK=1
make -C "/lib/modules/$KVER/build" M="$BUILD" modules >"$RUN/build.log" 2>&1 || BUILD_OK=0
[ "$BUILD_OK" = 1 ] || { cat "$RUN/build.log" >&2; bail "module build failed (log above)"; }
MOD_WARNINGS=$(grep -c -i "warning:" "$RUN/build.log" || true)
gcc -static -O2 -Wall -Werror -Wno-unused-result -o "$BUILD/vmtest" "$HERE/tests/vmtest.c" \
  >"$RUN/vmtest-build.log" 2>&1 || { cat "$RUN/vmtest-build.log" >&2; bail "vmtest build failed"; }

# ---------------------------------------------------------------- python client in the VM
# The guest mounts the host's root read-only over 9p and runs tests/vm_pyclient.py with the
# project's interpreter (INFEROS_VM_PYTHON, default <repo>/.venv/bin/python) in a chroot.
REPO="$(cd "$HERE/../.." && pwd)"
PY="${INFEROS_VM_PYTHON:-$REPO/.venv/bin/python}"
PYCLIENT=0; PYCLIENT_WHY=""
NINEP_MODS=""
if [ -x "$PY" ] && "$PY" -c "import numpy" 2>/dev/null; then
  # 9p over virtio-pci and everything it depends on, in load order (from modules.dep)
  declare -A SEEN=()
  mod_order() {  # $1 = path relative to /lib/modules/$KVER
    local m="$1" d
    [ -n "${SEEN[$m]:-}" ] && return 0
    SEEN[$m]=1
    for d in $(grep "^$m:" "/lib/modules/$KVER/modules.dep" | cut -d: -f2); do mod_order "$d"; done
    NINEP_MODS+="$m "
  }
  for want in 9p 9pnet_virtio virtio_pci overlay; do
    rel=$(grep -oE "^[^:]*/$want\.ko(\.xz|\.zst|\.gz)?:" "/lib/modules/$KVER/modules.dep" | head -1 | tr -d :)
    if [ -z "$rel" ]; then
      if grep -q "/$want.ko" "/lib/modules/$KVER/modules.builtin" 2>/dev/null; then continue; fi
      PYCLIENT_WHY="kernel $KVER has no $want module"; break
    fi
    mod_order "$rel"
  done
  [ -z "$PYCLIENT_WHY" ] && PYCLIENT=1
else
  PYCLIENT_WHY="no interpreter with numpy at $PY (set INFEROS_VM_PYTHON)"
fi

# ---------------------------------------------------------------- accelerator
ACCEL="${INFEROS_VM_ACCEL:-}"
if [ -z "$ACCEL" ]; then
  # KVM only when the CPU exposes VMX/SVM and a probe VM really boots (a nested /dev/kvm can
  # open fine and still hang or abort the guest).
  ACCEL=tcg
  if [ -r /dev/kvm ] && [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
    probe="$RUN/kvm-probe"; mkdir -p "$probe/bin"
    cp "$(command -v busybox)" "$probe/bin/busybox"
    printf '#!/bin/busybox sh\n/bin/busybox echo kvm-probe-ok\n/bin/busybox reboot -f\n' >"$probe/init"
    chmod +x "$probe/init"
    (cd "$probe" && find . | cpio -o -H newc --quiet) >"$RUN/kvm-probe.cpio"
    timeout 30 qemu-system-x86_64 -accel kvm -cpu host -m 256 -nodefaults -nographic -no-reboot \
      -kernel "/boot/vmlinuz-$KVER" -initrd "$RUN/kvm-probe.cpio" \
      -append "console=ttyS0 panic=-1 quiet" -serial "file:$RUN/kvm-probe.log" </dev/null \
      >"$RUN/kvm-probe.qemu.log" 2>&1 || true
    if grep -q kvm-probe-ok "$RUN/kvm-probe.log" 2>/dev/null; then
      ACCEL=kvm
    fi
  fi
fi
if [ "$ACCEL" = kvm ]; then CPU=host; else CPU=max; fi
QEMU_VERSION=$(qemu-system-x86_64 --version | head -1)
log "VM: $ACCEL, kernel $KVER, $SMP vCPUs, $MEM_MB MiB ($QEMU_VERSION)"

# ---------------------------------------------------------------- debug aids
has_config() { grep -q "^$1=y" "$KCONFIG" 2>/dev/null; }
DEBUG_APPEND="init_on_free=1 panic_on_warn=1"
AIDS_ON=("init_on_free=1" "panic_on_warn=1")
AIDS_OFF=()
if has_config CONFIG_SLUB_DEBUG; then DEBUG_APPEND+=" slub_debug=FZPU"; AIDS_ON+=("slub_debug=FZPU")
else AIDS_OFF+=("slub_debug (CONFIG_SLUB_DEBUG not set)"); fi
if has_config CONFIG_PAGE_POISONING; then DEBUG_APPEND+=" page_poison=1"; AIDS_ON+=("page_poison=1")
else AIDS_OFF+=("page_poison (CONFIG_PAGE_POISONING not set)"); fi
KMEMLEAK=0
if has_config CONFIG_DEBUG_KMEMLEAK; then DEBUG_APPEND+=" kmemleak=on"; AIDS_ON+=("kmemleak=on"); KMEMLEAK=1
else AIDS_OFF+=("kmemleak (CONFIG_DEBUG_KMEMLEAK not set)"); fi
if has_config CONFIG_DEBUG_PAGEALLOC; then DEBUG_APPEND+=" debug_pagealloc=on"; AIDS_ON+=("debug_pagealloc=on")
else AIDS_OFF+=("debug_pagealloc (CONFIG_DEBUG_PAGEALLOC not set)"); fi
for c in KASAN KFENCE PROVE_LOCKING DEBUG_ATOMIC_SLEEP UBSAN DEBUG_VM; do
  has_config "CONFIG_$c" || AIDS_OFF+=("CONFIG_$c (needs a kernel rebuild)")
done

# ---------------------------------------------------------------- initramfs
make_initramfs() {  # $1 = config name
  local dir="$RUN/initramfs-$1"
  rm -rf "$dir"; mkdir -p "$dir/bin" "$dir/proc" "$dir/sys" "$dir/dev" "$dir/tmp"
  cp "$(command -v busybox)" "$dir/bin/busybox"
  cp "$BUILD/inferos.ko" "$BUILD/vmtest" "$dir/"
  local loads="" m base
  if [ "$PYCLIENT" = 1 ] && [ "$1" = base ]; then
    mkdir -p "$dir/mods"
    for m in $NINEP_MODS; do
      base=$(basename "$m"); base="${base%%.ko*}"
      case "$m" in
        *.xz) xz -dc "/lib/modules/$KVER/$m" >"$dir/mods/$base.ko" ;;
        *.zst) zstd -qdc "/lib/modules/$KVER/$m" >"$dir/mods/$base.ko" ;;
        *.gz) gzip -dc "/lib/modules/$KVER/$m" >"$dir/mods/$base.ko" ;;
        *) cp "/lib/modules/$KVER/$m" "$dir/mods/$base.ko" ;;
      esac
      loads+="$base "
    done
  fi
  cat >"$dir/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 3>/dev/ttyS1
tap() { if [ "\$1" = 0 ]; then echo "ok - \$2" >&3; else echo "not ok - \$2" >&3; fi; }
echo "# guest kernel \$(uname -r); cmdline: \$(cat /proc/cmdline)" >&3
if insmod /inferos.ko pool_size=0 2>/dev/null; then tap 1 "insmod pool_size=0 is refused"; rmmod inferos
else tap 0 "insmod pool_size=0 is refused"; fi
if insmod /inferos.ko pool_size=12345 2>/dev/null; then tap 1 "insmod pool_size=12345 (not a page multiple) is refused"; rmmod inferos
else tap 0 "insmod pool_size=12345 (not a page multiple) is refused"; fi
insmod /inferos.ko; tap \$? "insmod inferos.ko (default pool_size)"
grep -q '^inferos ' /proc/modules; tap \$? "inferos listed in /proc/modules"
/vmtest $POOL_BYTES >&3 2>&3
echo "# vmtest exit status \$?" >&3
if [ -n "$loads" ]; then
  for m in $loads; do insmod /mods/\$m.ko || echo "# insmod \$m failed" >&3; done
  mkdir -p /host
  if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host; then
    mount -t proc proc /host/proc; mount -t sysfs sysfs /host/sys
    mount -t devtmpfs devtmpfs /host/dev; mount -t tmpfs tmpfs /host/tmp
    chroot /host /usr/bin/env -i PATH=/usr/bin:/bin HOME=/tmp PYTHONDONTWRITEBYTECODE=1 \
      "$PY" "$REPO/driver/linux/tests/vm_pyclient.py" "$REPO" >&3 2>&3
    echo "# vm_pyclient exit status \$?" >&3
    if [ -n "$GUEST_SCRIPT" ]; then   # e.g. a benchmark; its TAP and "# bench" lines are kept
      chroot /host /usr/bin/env -i PATH=/usr/bin:/bin HOME=/tmp PYTHONDONTWRITEBYTECODE=1 \
        "$PY" "$GUEST_SCRIPT" >&3 2>&3
      echo "# guest script exit status \$?" >&3
    fi
    umount /host/tmp /host/dev /host/sys /host/proc
    # \`inferos driver install\` / uninstall end to end, on a writable overlay of the host root
    mkdir -p /ovl; mount -t tmpfs tmpfs /ovl; mkdir -p /ovl/up /ovl/work /ovl/root
    if [ $INSTALL_TEST = 0 ]; then
      echo "# inferos driver install test skipped (--no-install-test)" >&3
    elif mount -t overlay overlay -o lowerdir=/host,upperdir=/ovl/up,workdir=/ovl/work /ovl/root; then
      R=/ovl/root
      mount -t proc proc \$R/proc; mount -t sysfs sysfs \$R/sys; mount -t devtmpfs devtmpfs \$R/dev
      mount -t tmpfs tmpfs \$R/tmp
      CH="chroot \$R /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PYTHONDONTWRITEBYTECODE=1"
      \$CH "$PY" -m lemonade_inferos.cli driver install --no-dkms --pool-size 64M >/tmp/install.log 2>&1
      rc=\$?; sed 's/^/#   install: /' /tmp/install.log >&3
      tap \$rc "inferos driver install --no-dkms --pool-size 64M (builds in the VM, reloads, sets permissions)"
      perm=\$(\$CH stat -c '%a %U:%G' /dev/inferos 2>&1)
      [ "\$perm" = "660 root:inferos" ]; tap \$? "after install: /dev/inferos is root:inferos 0660 (\$perm)"
      [ "\$(cat /sys/module/inferos/parameters/pool_size 2>/dev/null)" = 67108864 ]
      tap \$? "after install: the module runs with pool_size=67108864"
      \$CH "$PY" -m lemonade_inferos.cli driver status >/tmp/status.log 2>&1
      rc=\$?; sed 's/^/#   status: /' /tmp/status.log >&3; tap \$rc "inferos driver status exits 0 with the driver loaded"
      \$CH "$PY" -m lemonade_inferos.cli driver uninstall >/tmp/un.log 2>&1
      rc=\$?; sed 's/^/#   uninstall: /' /tmp/un.log >&3
      [ \$rc = 0 ] && [ ! -e /sys/module/inferos ] && [ ! -e \$R/etc/udev/rules.d/70-inferos.rules ]
      tap \$? "inferos driver uninstall unloads the module and removes its udev rule"
      \$CH "$PY" -m lemonade_inferos.cli driver status >/dev/null 2>&1
      [ \$? = 1 ]; tap \$? "inferos driver status exits 1 once the driver is gone"
      umount \$R/tmp \$R/dev \$R/sys \$R/proc; umount \$R
      insmod /inferos.ko   # for the rmmod check below
    else
      echo "not ok - mount an overlay of the host root for the install test" >&3
    fi
    umount /ovl 2>/dev/null; umount /host
  else
    echo "not ok - py: mount the host root over 9p" >&3
  fi
fi
rmmod inferos; tap \$? "rmmod inferos"
[ ! -e /dev/inferos ]; tap \$? "/dev/inferos removed after rmmod"
if [ $KMEMLEAK = 1 ]; then
  mount -t debugfs none /sys/kernel/debug
  echo scan >/sys/kernel/debug/kmemleak; sleep 6; echo scan >/sys/kernel/debug/kmemleak
  echo "# kmemleak-report-begin" >&3; cat /sys/kernel/debug/kmemleak >&3; echo "# kmemleak-report-end" >&3
fi
echo "# dmesg-begin" >&3
dmesg >&3
echo "# dmesg-end" >&3
echo "# guest-done" >&3
sync
reboot -f
EOF
  chmod +x "$dir/init"
  (cd "$dir" && find . | cpio -o -H newc --quiet) >"$RUN/initramfs-$1.cpio"
}

# Kernel messages that fail the run.  "inferos: leak" is the module's own check at unload.
BAD_KERNEL_RE='WARNING:|BUG:|Oops|general protection fault|Kernel panic|kernel BUG|unreferenced object|inferos: leak|Poison overwritten|Redzone|Object padding|Padding overwritten|corrupted|list_add corruption|list_del corruption|refcount_t:|UBSAN|soft lockup|hard LOCKUP|blocked for more than|rcu_sched self-detected|Call Trace'

TAP_LINES=()
BENCH_LINES=()
add() { TAP_LINES+=("$1"); }
if [ "$MOD_WARNINGS" = 0 ]; then add "ok - module builds against $KVER headers without compiler warnings"
else add "not ok - module builds against $KVER headers without compiler warnings ($MOD_WARNINGS)"; fi

for cfg in $CONFIGS; do
  append="console=ttyS0 panic=-1 oops=panic"
  [ "$cfg" = debug ] && append+=" $DEBUG_APPEND"
  make_initramfs "$cfg"
  log "booting config '$cfg' ($ACCEL): $append"
  virtfs=()
  if [ "$PYCLIENT" = 1 ] && [ "$cfg" = base ]; then
    virtfs=(-virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
  fi
  t0=$(date +%s)
  set +e
  timeout "$TIMEOUT" qemu-system-x86_64 -accel "$ACCEL" -cpu "$CPU" -m "$MEM_MB" -smp "$SMP" \
    -nodefaults -nographic -no-reboot \
    -kernel "/boot/vmlinuz-$KVER" -initrd "$RUN/initramfs-$cfg.cpio" -append "$append" \
    -serial "file:$RUN/console-$cfg.log" -serial "file:$RUN/guest-$cfg.tap" "${virtfs[@]}" \
    </dev/null >"$RUN/qemu-$cfg.log" 2>&1
  rc=$?
  set -e
  secs=$(( $(date +%s) - t0 ))
  log "config '$cfg' finished in ${secs}s (qemu exit $rc)"
  touch "$RUN/guest-$cfg.tap" "$RUN/console-$cfg.log"
  guest="$RUN/guest-$cfg.tap"
  while IFS= read -r line; do
    line="${line%$'\r'}"
    case "$line" in
      "ok - "*) add "ok - [$cfg] ${line#ok - }" ;;
      "not ok - "*) add "not ok - [$cfg] ${line#not ok - }" ;;
      "Bail out!"*) add "not ok - [$cfg] guest bailed out: ${line#Bail out! }" ;;
      "# bench "*) [ "$cfg" = base ] && BENCH_LINES+=("${line#\# bench }"); add "# [$cfg] ${line#\# }" ;;
      "# dmesg-begin"|"# kmemleak-report-begin") break ;;
      "#"*) add "# [$cfg] ${line#\# }" ;;
    esac
  done <"$guest"
  if grep -q "^# guest-done" "$guest"; then
    add "ok - [$cfg] VM booted, ran the guest tests and shut down (${secs}s)"
  else
    add "not ok - [$cfg] guest did not finish (qemu exit $rc after ${secs}s; see $RUN/console-$cfg.log)"
  fi
  # kernel log: the guest's dmesg dump plus everything printed on the console
  bad=$( { sed -n '/^# dmesg-begin/,/^# dmesg-end/p;/^# kmemleak-report-begin/,/^# kmemleak-report-end/p' "$guest"; cat "$RUN/console-$cfg.log"; } \
         | tr -d '\r' | grep -E "$BAD_KERNEL_RE" | sort -u | head -20 || true)
  if [ -z "$bad" ]; then
    add "ok - [$cfg] kernel log has no WARNING/BUG/Oops/panic/leak/corruption message"
  else
    add "not ok - [$cfg] kernel log has no WARNING/BUG/Oops/panic/leak/corruption message"
    while IFS= read -r b; do add "#   $b"; done <<<"$bad"
  fi
done

# ---------------------------------------------------------------- TAP
n=0; fails=0
for l in "${TAP_LINES[@]}"; do case "$l" in "ok - "*|"not ok - "*) n=$((n + 1)) ;; esac; done
echo "TAP version 13"
echo "1..$n"
echo "# VM: accel=$ACCEL kernel=$KVER vcpus=$SMP mem=${MEM_MB}MiB $QEMU_VERSION"
echo "# host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) CPUs"
echo "# module build: $MOD_WARNINGS compiler warning(s)"
if [ "$PYCLIENT" = 1 ]; then echo "# python client tested in config 'base' with $PY over 9p"
else echo "# python client not tested in the VM: $PYCLIENT_WHY"; fi
for a in "${AIDS_ON[@]}"; do echo "# debug aid enabled in config 'debug': $a"; done
for a in "${AIDS_OFF[@]}"; do echo "# debug aid unavailable: $a"; done
i=0
for l in "${TAP_LINES[@]}"; do
  case "$l" in
    "ok - "*) i=$((i + 1)); echo "ok $i ${l#ok }" ;;
    "not ok - "*) i=$((i + 1)); fails=$((fails + 1)); echo "not ok $i ${l#not ok }" ;;
    *) echo "$l" ;;
  esac
done
[ "$MOD_WARNINGS" = 0 ] || { echo "# module build warnings:"; grep -i "warning:" "$RUN/build.log" | sed 's/^/#   /'; }

if [ -n "$BENCH_JSON" ] && [ ${#BENCH_LINES[@]} -gt 0 ]; then
  {
    echo "{"
    echo "  \"vm\": {\"accel\": \"$ACCEL\", \"kernel\": \"$KVER\", \"vcpus\": $SMP, \"mem_mib\": $MEM_MB,"
    echo "         \"qemu\": \"$QEMU_VERSION\","
    echo "         \"host_cpu\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')\", \"host_cpus\": $(nproc)},"
    echo "  \"unit\": \"ns\","
    echo "  \"results\": {"
    k=0
    for b in "${BENCH_LINES[@]}"; do
      k=$((k + 1)); name="${b%% *}"; rest="${b#* }"
      fields=$(echo "$rest" | sed -E 's/([a-z_0-9]+)=([0-9.]+)/"\1": \2,/g; s/,$//')
      sep=","; [ "$k" = "${#BENCH_LINES[@]}" ] && sep=""
      echo "    \"$name\": {$fields}$sep"
    done
    echo "  }"
    echo "}"
  } >"$BENCH_JSON"
  log "benchmark numbers written to $BENCH_JSON"
fi
[ "$fails" = 0 ] && [ "$n" -gt 0 ]

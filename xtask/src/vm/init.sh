#!/bin/busybox sh
# PID 1 of the test guest (xtask/src/vm/initramfs.rs). Loads the boot
# modules, mounts the host's root (read-only over 9p, under a tmpfs
# overlay) at /newroot with the kernel filesystems the tests use, runs the script named by
# xtask.script= in a chroot there, prints its exit code on a marker line
# the host reads, and powers off. It stays in the initramfs itself so that
# the kernel's module loader (which runs in PID 1's root) finds
# /sbin/modprobe.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev

for word in $($B cat /proc/cmdline); do
	case $word in
	xtask.script=*) SCRIPT=${word#*=} ;;
	xtask.modroot=*) MODROOT=${word#*=} ;;
	esac
done

fail() {
	echo "XTASK-VM-EXIT 125 $*"
	$B poweroff -f
}

for m in /boot-modules/*.ko; do
	# None when the kernel has them built in.
	[ -e "$m" ] || continue
	$B insmod "$m" || fail "insmod $m"
done
$B mkdir -p /host /layer
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host \
	|| fail "mounting the host's root over 9p"
# Writes land in a tmpfs layer, never on the host (its share is read-only).
$B mount -t tmpfs tmpfs /layer
$B mkdir /layer/upper /layer/work
$B mount -t overlay overlay -o lowerdir=/host,upperdir=/layer/upper,workdir=/layer/work /newroot \
	|| fail "mounting an overlay on the host's root"
R=/newroot
$B mount -t proc proc $R/proc
$B mount -t sysfs sys $R/sys
$B mount -t devtmpfs dev $R/dev
$B mkdir -p $R/dev/pts $R/dev/shm
$B mount -t devpts devpts $R/dev/pts
$B mount -t tmpfs tmpfs $R/dev/shm
$B mount -t tmpfs tmpfs $R/run
$B mount -t tmpfs tmpfs $R/tmp
$B mount -t tracefs tracefs $R/sys/kernel/tracing
$B mount -t debugfs debugfs $R/sys/kernel/debug
$B mount -t bpf bpf $R/sys/fs/bpf
$B mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
$B ip link set lo up

# Netfilter and the rest are modules here: the package's modules directory
# is mounted where modprobe looks in the chroot. The kernel's requests run
# /sbin/modprobe in this root, which runs the chroot's.
REL=$($B uname -r)
$B mkdir -p $R/lib/modules/$REL
$B mount -o bind "$R$MODROOT/lib/modules/$REL" $R/lib/modules/$REL || fail "mounting the modules of $REL"
$B mkdir -p /sbin
printf '#!/bin/busybox sh\nexec /bin/busybox chroot %s /sbin/modprobe "$@"\n' "$R" > /sbin/modprobe
$B chmod +x /sbin/modprobe

$B chroot $R /bin/sh "$SCRIPT"
echo "XTASK-VM-EXIT $?"
$B poweroff -f

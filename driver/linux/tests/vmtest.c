// SPDX-License-Identifier: GPL-2.0
/*
 * vmtest - exercises /dev/inferos inside the test VM (driver/linux/test-in-vm.sh) and prints
 * TAP lines without numbers ("ok - name", "not ok - name # why"); the host script numbers
 * them.  Benchmark lines start with "# bench".  Built static: the VM holds only busybox.
 *
 *   vmtest POOL_BYTES
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../inferos_ioctl.h"

#define DEV "/dev/inferos"
#define KIB 1024ULL
#define MIB (1024ULL * 1024ULL)

static uint64_t pool_bytes;
static long page;
static int failures;

static void result(int pass, const char *fmt, ...)
{
	va_list ap;

	printf("%s - ", pass ? "ok" : "not ok");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (!pass)
		failures++;
}

/* ioctl expected to fail with errno `want` */
static void expect_errno(int ret, int want, const char *what)
{
	int got = ret < 0 ? errno : 0;

	if (ret < 0 && got == want)
		result(1, "%s -> %s", what, strerrorname_np(want));
	else
		result(0, "%s -> %s # got ret=%d errno=%s", what, strerrorname_np(want), ret,
		       ret < 0 ? strerrorname_np(got) : "none");
}

static int xopen(void)
{
	int fd = open(DEV, O_RDWR | O_CLOEXEC);

	if (fd < 0) {
		printf("Bail out! open %s: %s\n", DEV, strerror(errno));
		exit(1);
	}
	return fd;
}

static struct inferos_memory_pool pool_status(int fd)
{
	struct inferos_memory_pool mp;

	if (ioctl(fd, INFEROS_IOC_GET_MEMORY_POOL, &mp))
		memset(&mp, 0xff, sizeof(mp));
	return mp;
}

static struct inferos_scheduler_stats sched_stats(int fd)
{
	struct inferos_scheduler_stats ss;

	if (ioctl(fd, INFEROS_IOC_GET_SCHEDULER_STATS, &ss))
		memset(&ss, 0xff, sizeof(ss));
	return ss;
}

static int alloc_block(int fd, uint64_t size, uint64_t *offset, uint64_t *rounded)
{
	struct inferos_alloc a = { .size = size };
	int ret = ioctl(fd, INFEROS_IOC_ALLOC_PINNED, &a);

	if (!ret) {
		*offset = a.offset;
		if (rounded)
			*rounded = a.size;
	}
	return ret;
}

static int free_block(int fd, uint64_t offset)
{
	struct inferos_free f = { .offset = offset };

	return ioctl(fd, INFEROS_IOC_FREE_PINNED, &f);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* ------------------------------------------------------------------ tests */

static void test_node_and_info(void)
{
	struct stat st;
	struct inferos_info info;
	int fd;

	result(stat(DEV, &st) == 0 && S_ISCHR(st.st_mode), "device node %s exists", DEV);
	result((st.st_mode & 0777) == 0660, "device mode is 0660 (got %o)", st.st_mode & 0777);
	fd = xopen();
	result(ioctl(fd, INFEROS_IOC_GET_INFO, &info) == 0, "GET_INFO succeeds");
	result(info.abi_version == INFEROS_ABI_VERSION, "GET_INFO abi_version == %d (got %u)",
	       INFEROS_ABI_VERSION, info.abi_version);
	result(info.granularity_bytes == page, "GET_INFO granularity == page size %ld (got %u)",
	       page, info.granularity_bytes);
	result(info.pool_bytes == pool_bytes, "GET_INFO pool_bytes == %llu (got %llu)",
	       (unsigned long long)pool_bytes, (unsigned long long)info.pool_bytes);
	close(fd);
}

/* Temperature expected iff a zone of a type the module tries exists in sysfs. */
static int sysfs_zone_temp(const char *want, long *temp)
{
	glob_t g;
	int found = 0;

	if (glob("/sys/class/thermal/thermal_zone*/type", 0, NULL, &g))
		return 0;
	for (size_t i = 0; i < g.gl_pathc && !found; i++) {
		char type[64] = "", path[256];
		FILE *f = fopen(g.gl_pathv[i], "r");

		if (!f)
			continue;
		if (fscanf(f, "%63s", type) == 1 && strcmp(type, want) == 0) {
			snprintf(path, sizeof(path), "%s", g.gl_pathv[i]);
			strcpy(strrchr(path, '/'), "/temp");
			FILE *t = fopen(path, "r");

			if (t && fscanf(t, "%ld", temp) == 1)
				found = 1;
			if (t)
				fclose(t);
		}
		fclose(f);
	}
	globfree(&g);
	return found;
}

static void test_gpu_status(void)
{
	struct inferos_gpu_status g;
	struct sysinfo si;
	long temp = 0;
	int fd = xopen(), has_zone;
	uint64_t ram;

	result(ioctl(fd, INFEROS_IOC_GET_GPU_STATUS, &g) == 0, "GET_GPU_STATUS succeeds");
	result(g.utilization_permille == INFEROS_UNAVAILABLE_U32 &&
	       !(g.flags & INFEROS_GPU_HAS_UTILIZATION),
	       "GPU utilization reported unavailable (no vendor-neutral source)");
	result(g.memory_used_bytes == INFEROS_UNAVAILABLE_U64 &&
	       g.memory_total_bytes == INFEROS_UNAVAILABLE_U64 && !(g.flags & INFEROS_GPU_HAS_MEMORY),
	       "GPU memory reported unavailable");
	sysinfo(&si);
	ram = (uint64_t)si.totalram * si.mem_unit;
	result((g.flags & INFEROS_GPU_HAS_SYSTEM_MEMORY) && g.system_memory_total_bytes == ram,
	       "system memory total == sysinfo totalram (%llu)", (unsigned long long)ram);
	result(g.system_memory_available_bytes > 0 &&
	       g.system_memory_available_bytes <= g.system_memory_total_bytes,
	       "system memory available in (0, total] (%llu)",
	       (unsigned long long)g.system_memory_available_bytes);
	has_zone = sysfs_zone_temp("acpitz", &temp) || sysfs_zone_temp("x86_pkg_temp", &temp);
	if (has_zone)
		result((g.flags & INFEROS_GPU_HAS_TEMPERATURE) &&
		       labs((long)g.temperature_mc - temp) < 5000,
		       "temperature from thermal zone '%s' matches sysfs (%d vs %ld mC)",
		       g.thermal_zone, g.temperature_mc, temp);
	else
		result(g.temperature_mc == INFEROS_UNAVAILABLE_S32 && g.thermal_zone[0] == 0 &&
		       !(g.flags & INFEROS_GPU_HAS_TEMPERATURE),
		       "no acpitz/x86_pkg_temp thermal zone: temperature unavailable, zone \"\"");
	close(fd);
}

static void test_pool_fresh(void)
{
	int fd = xopen();
	struct inferos_memory_pool mp = pool_status(fd);

	result(mp.total_bytes == pool_bytes && mp.used_bytes == 0 && mp.free_bytes == pool_bytes &&
	       mp.block_count == 0 && mp.largest_free_bytes == pool_bytes &&
	       mp.fragmentation_permille == 0,
	       "fresh pool: total=free=largest=%llu, used=0, blocks=0, fragmentation=0",
	       (unsigned long long)pool_bytes);
	close(fd);
}

static void test_alloc_rounding_and_mmap(void)
{
	int fd = xopen();
	uint64_t off, size, off2;
	struct inferos_memory_pool mp;
	unsigned char *p;
	size_t i, bad = 0;

	result(alloc_block(fd, 1, &off, &size) == 0 && size == (uint64_t)page && off % page == 0 &&
	       off < pool_bytes, "ALLOC 1 byte -> one page at a page-aligned offset");
	mp = pool_status(fd);
	result(mp.used_bytes == (uint64_t)page && mp.block_count == 1 &&
	       mp.free_bytes == pool_bytes - page, "pool counts the 1-page block");
	result(free_block(fd, off) == 0, "FREE the 1-page block");

	result(alloc_block(fd, MIB, &off, &size) == 0 && size == MIB, "ALLOC 1 MiB");
	p = mmap(NULL, MIB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off);
	result(p != MAP_FAILED, "mmap the 1 MiB block (MAP_SHARED)");
	if (p == MAP_FAILED)
		return;
	for (i = 0; i < MIB; i++)
		bad += p[i] != 0;
	result(bad == 0, "new block is zero-filled");
	for (i = 0; i < MIB; i++)
		p[i] = (unsigned char)(i * 7 + 3);
	expect_errno(free_block(fd, off), EBUSY, "FREE while mapped");
	munmap(p, MIB);
	p = mmap(NULL, MIB, PROT_READ, MAP_SHARED, fd, off);
	bad = 0;
	for (i = 0; p != MAP_FAILED && i < MIB; i++)
		bad += p[i] != (unsigned char)(i * 7 + 3);
	result(p != MAP_FAILED && bad == 0, "data written through one mapping reads back through another");
	if (p != MAP_FAILED)
		munmap(p, MIB);
	result(free_block(fd, off) == 0, "FREE after munmap");

	/* the same range handed out again must not show the previous owner's data */
	result(alloc_block(fd, MIB, &off2, NULL) == 0, "ALLOC 1 MiB again");
	p = mmap(NULL, MIB, PROT_READ, MAP_SHARED, fd, off2);
	bad = 0;
	for (i = 0; p != MAP_FAILED && i < MIB; i++)
		bad += p[i] != 0;
	result(p != MAP_FAILED && bad == 0, "re-allocated block is zero-filled (offset %s)",
	       off2 == off ? "reused" : "different");
	if (p != MAP_FAILED)
		munmap(p, MIB);
	free_block(fd, off2);
	close(fd);
}

static void test_fragmentation(void)
{
	int fd = xopen();
	uint64_t off[8], blk = 64 * KIB, free_b, largest, frag;
	struct inferos_memory_pool mp;
	int contiguous = 1;

	for (int i = 0; i < 8; i++) {
		if (alloc_block(fd, blk, &off[i], NULL))
			contiguous = 0;
		else if (off[i] != i * blk)
			contiguous = 0;
	}
	result(contiguous, "8 x 64 KiB blocks are placed first-fit at offsets 0, 64K, ...");
	free_block(fd, off[1]);
	free_block(fd, off[3]);
	free_block(fd, off[5]);
	mp = pool_status(fd);
	free_b = pool_bytes - 5 * blk;
	largest = pool_bytes - 8 * blk;
	frag = 1000 - largest * 1000 / free_b;
	result(mp.block_count == 5 && mp.used_bytes == 5 * blk && mp.free_bytes == free_b,
	       "3 holes: 5 blocks, used %llu", (unsigned long long)(5 * blk));
	result(mp.largest_free_bytes == largest, "largest free == tail %llu (got %llu)",
	       (unsigned long long)largest, (unsigned long long)mp.largest_free_bytes);
	result(mp.fragmentation_permille == frag, "fragmentation == 1000*(1-largest/free) = %llu (got %u)",
	       (unsigned long long)frag, mp.fragmentation_permille);
	close(fd); /* releases the remaining 5 blocks */
	fd = xopen();
	mp = pool_status(fd);
	result(mp.used_bytes == 0 && mp.block_count == 0, "close() released the remaining blocks");
	close(fd);
}

static void test_exhaustion(void)
{
	int fd = xopen();
	uint64_t n = pool_bytes / MIB, got = 0, off, tmp;
	uint64_t *offs = calloc(n + 1, sizeof(*offs));
	struct inferos_memory_pool mp;
	int ret;

	while (got <= n && (ret = alloc_block(fd, MIB, &offs[got], NULL)) == 0)
		got++;
	result(got == n && ret < 0 && errno == ENOMEM,
	       "pool fills with exactly %llu x 1 MiB blocks, then ENOMEM (got %llu)",
	       (unsigned long long)n, (unsigned long long)got);
	expect_errno(alloc_block(fd, page, &tmp, NULL), ENOMEM, "ALLOC one page from a full pool");
	mp = pool_status(fd);
	result(mp.used_bytes == pool_bytes && mp.free_bytes == 0 && mp.largest_free_bytes == 0 &&
	       mp.fragmentation_permille == 0 && mp.block_count == got,
	       "full pool: used=total, free=0, largest=0, fragmentation=0");
	ret = 0;
	for (uint64_t i = 0; i < got; i++)
		ret |= free_block(fd, offs[i]);
	mp = pool_status(fd);
	result(ret == 0 && mp.used_bytes == 0 && mp.block_count == 0,
	       "every block freed: pool empty again");
	result(alloc_block(fd, pool_bytes, &off, NULL) == 0 && off == 0 && free_block(fd, off) == 0,
	       "one block of the whole pool allocates and frees");
	free(offs);
	close(fd);
}

static int wait_ok(pid_t pid)
{
	int st;

	return waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

#define NCHILD 4
#define ITERS 500

static void test_multi_process(void)
{
	int fd = xopen(), go[2], ready[2];
	pid_t pids[NCHILD];
	struct inferos_scheduler_stats s0, s1, s2;
	struct inferos_memory_pool mp;
	char c;
	int all_ok = 1;

	s0 = sched_stats(fd);
	if (pipe(go) || pipe(ready))
		return;
	fflush(stdout);
	for (int k = 0; k < NCHILD; k++) {
		pids[k] = fork();
		if (pids[k] == 0) {
			int cfd = xopen(), bad = 0;
			uint64_t off;

			close(go[1]);
			write(ready[1], "r", 1);
			read(go[0], &c, 1);             /* all children start together */
			for (int i = 0; i < ITERS; i++) {
				struct inferos_request r = {};

				if (alloc_block(cfd, (i % 16 + 1) * page, &off, NULL) || free_block(cfd, off))
					bad++;
				if (ioctl(cfd, INFEROS_IOC_REQUEST_BEGIN, &r) || r.handle == 0)
					bad++;
				r.latency_us = 1000;
				r.tokens = 2;
				if (ioctl(cfd, INFEROS_IOC_REQUEST_END, &r))
					bad++;
			}
			_exit(bad ? 1 : 0);
		}
	}
	close(go[0]);
	for (int k = 0; k < NCHILD; k++)
		read(ready[0], &c, 1);
	s1 = sched_stats(fd);
	result(s1.processes == s0.processes + NCHILD && s1.open_handles == s0.open_handles + NCHILD,
	       "%d more processes holding the device are counted (processes %u -> %u)", NCHILD,
	       s0.processes, s1.processes);
	close(go[1]);                                   /* go */
	for (int k = 0; k < NCHILD; k++)
		all_ok &= wait_ok(pids[k]);
	s2 = sched_stats(fd);
	mp = pool_status(fd);
	result(all_ok, "%d processes x %d concurrent alloc/free + request begin/end all succeed",
	       NCHILD, ITERS);
	result(s2.requests_completed - s0.requests_completed == NCHILD * ITERS &&
	       s2.tokens_completed - s0.tokens_completed == 2 * NCHILD * ITERS &&
	       s2.total_latency_us - s0.total_latency_us == 1000ULL * NCHILD * ITERS &&
	       s2.requests_in_flight == 0,
	       "system-wide accounting: +%d completed, +%d tokens, +%llu us, 0 in flight",
	       NCHILD * ITERS, 2 * NCHILD * ITERS, 1000ULL * NCHILD * ITERS);
	result(s2.avg_latency_us == s2.total_latency_us / s2.requests_completed,
	       "avg_latency_us == total / completed (%llu)", (unsigned long long)s2.avg_latency_us);
	result(s2.processes == s0.processes && mp.used_bytes == 0,
	       "after the processes exit: processes back to %u, pool empty", s0.processes);
	close(fd);
}

static void test_kill_releases(void)
{
	int fd = xopen(), ready[2];
	struct inferos_memory_pool m0, m1, m2;
	struct inferos_scheduler_stats s0, s1, s2;
	pid_t pid;
	char c;

	m0 = pool_status(fd);
	s0 = sched_stats(fd);
	if (pipe(ready))
		return;
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		int cfd = xopen();
		uint64_t off[3];
		struct inferos_request r = {};

		for (int i = 0; i < 3; i++)
			alloc_block(cfd, 64 * KIB, &off[i], NULL);
		char *p = mmap(NULL, 64 * KIB, PROT_READ | PROT_WRITE, MAP_SHARED, cfd, off[1]);
		if (p != MAP_FAILED)
			memset(p, 0x5a, 64 * KIB);
		ioctl(cfd, INFEROS_IOC_REQUEST_BEGIN, &r);
		ioctl(cfd, INFEROS_IOC_REQUEST_BEGIN, &r);
		write(ready[1], "r", 1);
		for (;;)
			pause();
	}
	read(ready[0], &c, 1);
	m1 = pool_status(fd);
	s1 = sched_stats(fd);
	result(m1.used_bytes == m0.used_bytes + 192 * KIB && m1.block_count == m0.block_count + 3 &&
	       s1.requests_in_flight == s0.requests_in_flight + 2 && s1.processes == s0.processes + 1,
	       "child holds 3 blocks (one mapped), 2 requests in flight");
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	m2 = pool_status(fd);
	s2 = sched_stats(fd);
	result(m2.used_bytes == m0.used_bytes && m2.block_count == m0.block_count,
	       "SIGKILL: the child's blocks come back (used %llu -> %llu)",
	       (unsigned long long)m1.used_bytes, (unsigned long long)m2.used_bytes);
	result(s2.requests_in_flight == s0.requests_in_flight &&
	       s2.requests_aborted == s0.requests_aborted + 2 && s2.processes == s0.processes,
	       "SIGKILL: its 2 in-flight requests are counted aborted, process count drops");
	close(fd);
}

static void test_bad_arguments(void)
{
	int fd = xopen(), fd2 = xopen();
	uint64_t off, off2, tmp;
	struct inferos_request r = {}, r2 = {};
	struct inferos_alloc a;
	void *p;

	expect_errno(ioctl(fd, 0x222040, &a), ENOTTY, "unknown command 0x222040");
	expect_errno(ioctl(fd, INFEROS_IOC_MAP_PINNED, &a), ENOTTY, "MAP_PINNED (Windows only)");
	expect_errno(ioctl(fd, INFEROS_IOC_GET_SCHEDULER_STATS, NULL), EFAULT, "GET_SCHEDULER_STATS NULL");
	expect_errno(ioctl(fd, INFEROS_IOC_GET_GPU_STATUS, (void *)1), EFAULT, "GET_GPU_STATUS bad pointer");
	expect_errno(ioctl(fd, INFEROS_IOC_ALLOC_PINNED, (void *)8), EFAULT, "ALLOC_PINNED bad pointer");
	expect_errno(alloc_block(fd, 0, &tmp, NULL), EINVAL, "ALLOC size 0");
	expect_errno(alloc_block(fd, pool_bytes + 1, &tmp, NULL), EINVAL, "ALLOC size pool+1");
	expect_errno(alloc_block(fd, UINT64_MAX, &tmp, NULL), EINVAL, "ALLOC size 2^64-1");

	alloc_block(fd, 2 * page, &off, NULL);
	alloc_block(fd2, page, &off2, NULL);
	expect_errno(free_block(fd, off + 1), EINVAL, "FREE unaligned offset");
	expect_errno(free_block(fd, pool_bytes), EINVAL, "FREE offset == pool size");
	expect_errno(free_block(fd, UINT64_MAX & ~(uint64_t)(page - 1)), EINVAL, "FREE huge offset");
	expect_errno(free_block(fd, pool_bytes - page), ENOENT, "FREE never-allocated offset");
	expect_errno(free_block(fd, off + page), ENOENT, "FREE middle of a block");
	expect_errno(free_block(fd, off2), EPERM, "FREE another descriptor's block");
	expect_errno(ioctl(fd, INFEROS_IOC_FREE_PINNED, NULL), EFAULT, "FREE NULL");

	p = mmap(NULL, page, PROT_READ, MAP_SHARED, fd, off2);
	expect_errno(p == MAP_FAILED ? -1 : 0, EACCES, "mmap another descriptor's block");
	p = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, off);
	expect_errno(p == MAP_FAILED ? -1 : 0, EINVAL, "mmap MAP_PRIVATE");
	p = mmap(NULL, 3 * page, PROT_READ, MAP_SHARED, fd, off);
	expect_errno(p == MAP_FAILED ? -1 : 0, EINVAL, "mmap longer than the block");
	p = mmap(NULL, page, PROT_READ, MAP_SHARED, fd, pool_bytes - page);
	expect_errno(p == MAP_FAILED ? -1 : 0, EINVAL, "mmap offset that is not a block");

	result(free_block(fd, off) == 0, "FREE own block");
	expect_errno(free_block(fd, off), ENOENT, "double FREE");
	result(free_block(fd2, off2) == 0, "FREE by the owner of the other block");

	ioctl(fd, INFEROS_IOC_REQUEST_BEGIN, &r);
	ioctl(fd2, INFEROS_IOC_REQUEST_BEGIN, &r2);
	struct inferos_request e = { .handle = 0x7ffffff0 };
	expect_errno(ioctl(fd, INFEROS_IOC_REQUEST_END, &e), ENOENT, "REQUEST_END unknown handle");
	e.handle = 0;
	expect_errno(ioctl(fd, INFEROS_IOC_REQUEST_END, &e), ENOENT, "REQUEST_END handle 0");
	e.handle = 1ULL << 40;
	expect_errno(ioctl(fd, INFEROS_IOC_REQUEST_END, &e), ENOENT, "REQUEST_END handle >= 2^32");
	e.handle = r2.handle;
	expect_errno(ioctl(fd, INFEROS_IOC_REQUEST_END, &e), EPERM, "REQUEST_END another descriptor's handle");
	e.handle = r.handle;
	e.flags = 0x80;
	expect_errno(ioctl(fd, INFEROS_IOC_REQUEST_END, &e), EINVAL, "REQUEST_END unknown flag");
	e.flags = 0;
	e.reserved = 1;
	expect_errno(ioctl(fd, INFEROS_IOC_REQUEST_END, &e), EINVAL, "REQUEST_END reserved != 0");
	e.reserved = 0;
	e.latency_us = INFEROS_MAX_LATENCY_US + 1;
	expect_errno(ioctl(fd, INFEROS_IOC_REQUEST_END, &e), EINVAL, "REQUEST_END latency > 24 h");
	e.latency_us = 5;
	result(ioctl(fd, INFEROS_IOC_REQUEST_END, &e) == 0, "REQUEST_END own handle");
	expect_errno(ioctl(fd, INFEROS_IOC_REQUEST_END, &e), ENOENT, "double REQUEST_END");
	e.handle = r2.handle;
	result(ioctl(fd2, INFEROS_IOC_REQUEST_END, &e) == 0, "REQUEST_END by the other handle's owner");

	/* kernel-timed latency */
	struct inferos_scheduler_stats s0 = sched_stats(fd), s1;
	ioctl(fd, INFEROS_IOC_REQUEST_BEGIN, &r);
	usleep(20000);
	e = (struct inferos_request){ .handle = r.handle, .flags = INFEROS_REQ_KERNEL_TIME };
	ioctl(fd, INFEROS_IOC_REQUEST_END, &e);
	s1 = sched_stats(fd);
	result(s1.total_latency_us - s0.total_latency_us >= 20000 &&
	       s1.total_latency_us - s0.total_latency_us < 2000000,
	       "REQUEST_END with KERNEL_TIME records the BEGIN->END time (>= 20 ms sleep: %llu us)",
	       (unsigned long long)(s1.total_latency_us - s0.total_latency_us));
	close(fd);
	close(fd2);

	/* permissions: mode 0660 root:root, so an unprivileged user cannot open it */
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0) {
		if (setgid(65534) || setuid(65534))
			_exit(2);
		_exit(open(DEV, O_RDWR) < 0 && errno == EACCES ? 0 : 1);
	}
	result(wait_ok(pid), "open as uid 65534 (not in the device group) -> EACCES");
}

/* ------------------------------------------------------------------ latency */

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void report(const char *name, uint64_t *v, int n, uint64_t batch_total_ns, int batch_n)
{
	qsort(v, n, sizeof(*v), cmp_u64);
	printf("# bench %s n=%d median_ns=%llu p99_ns=%llu min_ns=%llu", name, n,
	       (unsigned long long)v[n / 2], (unsigned long long)v[(int)(n * 0.99)],
	       (unsigned long long)v[0]);
	if (batch_n)   /* back-to-back calls timed as one: no clock read per call */
		printf(" batch_mean_ns=%llu", (unsigned long long)(batch_total_ns / batch_n));
	printf("\n");
	fflush(stdout);
}

static void bench(void)
{
	enum { N = 20000, NA = 5000, NB = 200 };
	uint64_t *v = calloc(N, sizeof(*v)), *w = calloc(N, sizeof(*w)), t0, t1, off = 0;
	struct inferos_scheduler_stats ss;
	struct inferos_memory_pool mp;
	struct inferos_info info;
	struct inferos_request r;
	int fd = xopen(), i, bad = 0;

	for (i = 0; i < N; i++) {             /* cost of the clock itself */
		t0 = now_ns();
		t1 = now_ns();
		v[i] = t1 - t0;
	}
	report("clock_gettime_pair", v, N, 0, 0);

	for (i = 0; i < N; i++) {
		t0 = now_ns();
		bad |= ioctl(fd, INFEROS_IOC_GET_INFO, &info);
		v[i] = now_ns() - t0;
	}
	t0 = now_ns();
	for (i = 0; i < N; i++)
		bad |= ioctl(fd, INFEROS_IOC_GET_INFO, &info);
	report("ioctl_get_info", v, N, now_ns() - t0, N);

	for (i = 0; i < N; i++) {
		t0 = now_ns();
		bad |= ioctl(fd, INFEROS_IOC_GET_SCHEDULER_STATS, &ss);
		v[i] = now_ns() - t0;
	}
	t0 = now_ns();
	for (i = 0; i < N; i++)
		bad |= ioctl(fd, INFEROS_IOC_GET_SCHEDULER_STATS, &ss);
	report("ioctl_get_scheduler_stats", v, N, now_ns() - t0, N);

	for (i = 0; i < NA; i++) {
		t0 = now_ns();
		bad |= ioctl(fd, INFEROS_IOC_GET_MEMORY_POOL, &mp);
		v[i] = now_ns() - t0;
	}
	report("ioctl_get_memory_pool", v, NA, 0, 0);

	for (i = 0; i < NA; i++) {
		t0 = now_ns();
		bad |= ioctl(fd, INFEROS_IOC_REQUEST_BEGIN, &r);
		t1 = now_ns();
		r.latency_us = 1;
		r.tokens = 1;
		r.flags = r.reserved = 0;
		bad |= ioctl(fd, INFEROS_IOC_REQUEST_END, &r);
		w[i] = now_ns() - t1;
		v[i] = t1 - t0;
	}
	report("ioctl_request_begin", v, NA, 0, 0);
	report("ioctl_request_end", w, NA, 0, 0);

	for (i = 0; i < NA; i++) {
		t0 = now_ns();
		bad |= alloc_block(fd, page, &off, NULL);
		t1 = now_ns();
		bad |= free_block(fd, off);
		w[i] = now_ns() - t1;
		v[i] = t1 - t0;
	}
	report("alloc_pinned_4KiB", v, NA, 0, 0);
	report("free_pinned_4KiB", w, NA, 0, 0);

	for (i = 0; i < NB; i++) {
		t0 = now_ns();
		bad |= alloc_block(fd, MIB, &off, NULL);
		t1 = now_ns();
		bad |= free_block(fd, off);
		w[i] = now_ns() - t1;
		v[i] = t1 - t0;
	}
	report("alloc_pinned_1MiB_zeroed", v, NB, 0, 0);
	report("free_pinned_1MiB", w, NB, 0, 0);
	result(!bad, "latency loops: every ioctl succeeded");
	free(v);
	free(w);
	close(fd);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	page = sysconf(_SC_PAGESIZE);
	pool_bytes = argc > 1 ? strtoull(argv[1], NULL, 0) : 256 * MIB;

	test_node_and_info();
	test_gpu_status();
	test_pool_fresh();
	test_alloc_rounding_and_mmap();
	test_fragmentation();
	test_exhaustion();
	test_multi_process();
	test_kill_releases();
	test_bad_arguments();
	test_pool_fresh();          /* nothing leaked by any test above */
	bench();
	printf("# vmtest done: %d failure(s)\n", failures);
	return failures ? 1 : 0;
}

/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * inferos_ioctl.h - the inferos driver protocol, shared by the Linux module, the C test
 * program and (mirrored with ctypes) lemonade_inferos/resources/driver.py.
 *
 * Command values: the seed's five codes (0x222010..0x222020) and the ones added after them
 * are the protocol's command values on every OS.  They are Windows
 * CTL_CODE(FILE_DEVICE_UNKNOWN = 0x22, function 0x804.., METHOD_BUFFERED, FILE_ANY_ACCESS)
 * = (0x22 << 16) | (function << 2).  On Linux they are passed to ioctl(2) unchanged; they do
 * not follow the _IOC() direction/size encoding, so the size of every argument is fixed by
 * this header (each struct's size is part of the ABI and is checked by the tests).
 *
 * Layout rules: little-endian, every __u64 on an 8-byte offset, explicit padding, every
 * struct a multiple of 8 bytes, so 32- and 64-bit callers see the same layout.  No floating
 * point: the seed's f32 fields become fixed-point integers (see each field).
 *
 * "Unavailable" values: a field the kernel cannot honestly fill carries
 * INFEROS_UNAVAILABLE_U32 / _S32 / _U64 and its INFEROS_GPU_HAS_* bit is clear.
 */
#ifndef INFEROS_IOCTL_H
#define INFEROS_IOCTL_H

#ifdef __KERNEL__
#include <linux/types.h>
#else
#include <linux/types.h>
#include <stdint.h>
#endif

#define INFEROS_ABI_VERSION 1
#define INFEROS_DEVICE_NAME "inferos"          /* /dev/inferos, \\.\Inferos on Windows */

/* CTL_CODE(0x22, function, METHOD_BUFFERED = 0, FILE_ANY_ACCESS = 0) */
#define INFEROS_CTL_CODE(function) ((0x22u << 16) | ((function) << 2))

#define INFEROS_IOC_GET_GPU_STATUS      0x222010u /* fn 0x804, out: inferos_gpu_status */
#define INFEROS_IOC_GET_MEMORY_POOL     0x222014u /* fn 0x805, out: inferos_memory_pool */
#define INFEROS_IOC_GET_SCHEDULER_STATS 0x222018u /* fn 0x806, out: inferos_scheduler_stats */
#define INFEROS_IOC_ALLOC_PINNED        0x22201Cu /* fn 0x807, in/out: inferos_alloc */
#define INFEROS_IOC_FREE_PINNED         0x222020u /* fn 0x808, in: inferos_free */
/* beyond the seed */
#define INFEROS_IOC_REQUEST_BEGIN       0x222024u /* fn 0x809, out: inferos_request (handle) */
#define INFEROS_IOC_REQUEST_END         0x222028u /* fn 0x80A, in: inferos_request */
#define INFEROS_IOC_GET_INFO            0x22202Cu /* fn 0x80B, out: inferos_info */
#define INFEROS_IOC_MAP_PINNED          0x222030u /* fn 0x80C, Windows only (Linux: mmap) */

#define INFEROS_UNAVAILABLE_U32 0xFFFFFFFFu
#define INFEROS_UNAVAILABLE_S32 (-2147483647 - 1)           /* INT32_MIN */
#define INFEROS_UNAVAILABLE_U64 0xFFFFFFFFFFFFFFFFull

#define INFEROS_THERMAL_NAME_LEN 20                         /* THERMAL_NAME_LENGTH */

/* inferos_gpu_status.flags: which fields hold real values */
#define INFEROS_GPU_HAS_UTILIZATION   (1u << 0)
#define INFEROS_GPU_HAS_TEMPERATURE   (1u << 1)
#define INFEROS_GPU_HAS_MEMORY        (1u << 2)
#define INFEROS_GPU_HAS_SYSTEM_MEMORY (1u << 3)

/* GET_GPU_STATUS.  Seed: { f32 utilization; u64 memory_used; u64 memory_total; f32 temperature } */
struct inferos_gpu_status {
	__u32 utilization_permille;  /* seed f32 utilization in % -> per-mille (0..1000);
				      * no vendor-neutral kernel source: always UNAVAILABLE_U32 */
	__s32 temperature_mc;        /* seed f32 temperature in deg C -> milli-deg C, read from the
				      * thermal zone named in thermal_zone; UNAVAILABLE_S32 if none */
	__u64 memory_used_bytes;     /* GPU memory: UNAVAILABLE_U64 (no vendor-neutral source) */
	__u64 memory_total_bytes;    /* GPU memory: UNAVAILABLE_U64 */
	__u64 system_memory_total_bytes;     /* RAM (si_meminfo); an APU's GPU shares it */
	__u64 system_memory_available_bytes; /* si_mem_available() */
	char  thermal_zone[INFEROS_THERMAL_NAME_LEN]; /* NUL-terminated zone type, "" if none */
	__u32 flags;                 /* INFEROS_GPU_HAS_* */
};

/* GET_MEMORY_POOL.  Seed: { u64 total_size; u64 used_size; u64 free_size; u32 block_count;
 * f32 fragmentation_ratio } */
struct inferos_memory_pool {
	__u64 total_bytes;           /* pool_size module parameter */
	__u64 used_bytes;            /* sum of allocated blocks (page-rounded sizes) */
	__u64 free_bytes;            /* total - used */
	__u64 largest_free_bytes;    /* largest contiguous free range */
	__u32 block_count;           /* allocated blocks, all callers */
	__u32 fragmentation_permille;/* seed f32 ratio 0..1 -> per-mille:
				      * 1000 * (1 - largest_free / free), 0 when free == 0 */
};

/* GET_SCHEDULER_STATS.  Seed: { u32 ai_processes; u32 scheduled_tasks; f32 average_latency_ms } */
struct inferos_scheduler_stats {
	__u32 processes;             /* distinct processes (tgids) holding the device open */
	__u32 open_handles;          /* open file descriptions */
	__u32 requests_in_flight;    /* REQUEST_BEGIN without REQUEST_END yet (seed: scheduled_tasks) */
	__u32 reserved0;             /* 0 */
	__u64 requests_completed;    /* REQUEST_END count since load */
	__u64 requests_aborted;      /* in flight when their handle's owner closed */
	__u64 tokens_completed;      /* sum of REQUEST_END tokens */
	__u64 total_latency_us;      /* sum of completed requests' latency, microseconds */
	__u64 avg_latency_us;        /* seed f32 average_latency_ms -> microseconds (integer mean) */
};

/* ALLOC_PINNED.  in: size (bytes, > 0, <= pool); out: size rounded up to granularity and the
 * offset to pass to mmap(2) (Linux) or MAP_PINNED (Windows).  New blocks are zero-filled. */
struct inferos_alloc {
	__u64 size;
	__u64 offset;
};

/* FREE_PINNED.  in: offset returned by ALLOC_PINNED on the same file descriptor. */
struct inferos_free {
	__u64 offset;
};

#define INFEROS_REQ_KERNEL_TIME (1u << 0) /* END: use the driver's BEGIN->END time as latency */
#define INFEROS_MAX_LATENCY_US  86400000000ull /* 24 h: larger latencies are rejected */

/* REQUEST_BEGIN (out: handle) and REQUEST_END (in: handle, latency_us, tokens, flags). */
struct inferos_request {
	__u64 handle;
	__u64 latency_us;            /* ignored with INFEROS_REQ_KERNEL_TIME */
	__u64 tokens;                /* tokens produced by the request */
	__u32 flags;                 /* INFEROS_REQ_* */
	__u32 reserved;              /* must be 0 */
};

/* GET_INFO */
struct inferos_info {
	__u32 abi_version;           /* INFEROS_ABI_VERSION */
	__u32 granularity_bytes;     /* allocation unit (PAGE_SIZE on Linux) */
	__u64 pool_bytes;            /* pool size */
};

/* MAP_PINNED (Windows only; Linux returns ENOTTY and maps with mmap):
 * in: offset, size of an owned block; out: user-mode address of the mapping. */
struct inferos_map {
	__u64 offset;
	__u64 size;
	__u64 user_address;
};

#endif /* INFEROS_IOCTL_H */

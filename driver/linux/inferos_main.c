// SPDX-License-Identifier: GPL-2.0
/*
 * inferos - pinned memory pool and system-wide inference request accounting for
 * lemonade-inferos, as a misc device /dev/inferos.  Protocol: inferos_ioctl.h, driver/README.md.
 *
 * Pool: pool_size bytes of vmalloc_user() memory (zeroed, never swapped: vmalloc pages are not
 * on the LRU), sub-allocated with the kernel's genalloc in PAGE_SIZE units and mapped into
 * user space per block with remap_vmalloc_range().
 *
 * Ownership: every block and every in-flight request belongs to the struct file that created
 * it; release() (last close of that file, i.e. also when the process is killed) gives them
 * back, so a crashed process leaks nothing.
 *
 * Locking: one mutex, inferos_lock, protects the genalloc pool's alloc/free, the blocks and
 * requests xarrays, every owner's lists, the open-file list and the statistics.  Lock order:
 * mmap_lock -> inferos_lock (mmap and the vm_ops open/close run under mmap_lock and take
 * inferos_lock).  Therefore no copy_{to,from}_user() (which may fault and take mmap_lock)
 * happens while inferos_lock is held: ioctls copy in, work under the lock, unlock, copy out.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/fs.h>
#include <linux/genalloc.h>
#include <linux/bitmap.h>
#include <linux/ktime.h>
#include <linux/list.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/thermal.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/vmalloc.h>
#include <linux/xarray.h>

#include "inferos_ioctl.h"

#define INFEROS_MAX_POOL (4ULL << 30) /* 4 GiB: a sanity bound for pool_size */

static unsigned long pool_size = 256UL << 20;
module_param(pool_size, ulong, 0444);
MODULE_PARM_DESC(pool_size, "pinned pool size in bytes (default 256 MiB; page multiple, <= 4 GiB)");

static char *thermal_zones = "acpitz,x86_pkg_temp";
module_param(thermal_zones, charp, 0444);
MODULE_PARM_DESC(thermal_zones,
		 "comma-separated thermal zone types tried in order for GET_GPU_STATUS temperature");

struct inferos_file {
	struct list_head node;      /* in inferos_files */
	pid_t tgid;                 /* process that opened the device */
	struct list_head blocks;    /* struct inferos_block.node */
	struct list_head requests;  /* struct inferos_req.node */
};

struct inferos_block {
	struct list_head node;
	struct inferos_file *owner;
	unsigned long offset;       /* bytes from the pool start, page aligned */
	size_t size;                /* page multiple */
	unsigned int mapcount;      /* live VMAs mapping this block */
};

struct inferos_req {
	struct list_head node;
	struct inferos_file *owner;
	u32 id;
	ktime_t start;
};

static DEFINE_MUTEX(inferos_lock);
static LIST_HEAD(inferos_files);
static DEFINE_XARRAY(inferos_blocks);           /* page index of block start -> block */
static DEFINE_XARRAY_ALLOC1(inferos_requests);  /* handle -> request */
static void *pool_base;
static struct gen_pool *pool;
static size_t pool_used;
static u32 pool_blocks;
static u32 req_next;

static struct {
	u32 in_flight;
	u64 completed, aborted, tokens, total_latency_us;
} stats;

/* ------------------------------------------------------------------ helpers */

static void inferos_vma_set_flags(struct vm_area_struct *vma, unsigned long flags)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, flags);
#else
	vma->vm_flags |= flags;
#endif
}

/* Largest free run of the pool bitmap, in bytes.  Caller holds inferos_lock, so no
 * allocation or free changes the bitmap meanwhile. */
static void largest_free_chunk(struct gen_pool *p, struct gen_pool_chunk *chunk, void *data)
{
	size_t *largest = data;
	unsigned long nbits = (chunk->end_addr - chunk->start_addr + 1) >> p->min_alloc_order;
	unsigned long start = 0, end;

	while (start < nbits) {
		start = find_next_zero_bit(chunk->bits, nbits, start);
		if (start >= nbits)
			break;
		end = find_next_bit(chunk->bits, nbits, start);
		if (((size_t)(end - start) << p->min_alloc_order) > *largest)
			*largest = (size_t)(end - start) << p->min_alloc_order;
		start = end;
	}
}

static void release_block_locked(struct inferos_block *blk)
{
	xa_erase(&inferos_blocks, blk->offset >> PAGE_SHIFT);
	gen_pool_free(pool, (unsigned long)pool_base + blk->offset, blk->size);
	pool_used -= blk->size;
	pool_blocks--;
	list_del(&blk->node);
	kfree(blk);
}

static void drop_request_locked(struct inferos_req *req)
{
	xa_erase(&inferos_requests, req->id);
	list_del(&req->node);
	stats.in_flight--;
	kfree(req);
}

/* ------------------------------------------------------------------ file ops */

static int inferos_open(struct inode *inode, struct file *file)
{
	struct inferos_file *f = kzalloc(sizeof(*f), GFP_KERNEL);

	if (!f)
		return -ENOMEM;
	f->tgid = task_tgid_nr(current);
	INIT_LIST_HEAD(&f->blocks);
	INIT_LIST_HEAD(&f->requests);
	mutex_lock(&inferos_lock);
	list_add_tail(&f->node, &inferos_files);
	mutex_unlock(&inferos_lock);
	file->private_data = f;
	return 0;
}

/* Last reference to the file is gone: no VMA maps any of its blocks any more (each VMA holds a
 * reference to the file), so every block and in-flight request can be given back. */
static int inferos_release(struct inode *inode, struct file *file)
{
	struct inferos_file *f = file->private_data;
	struct inferos_block *blk, *btmp;
	struct inferos_req *req, *rtmp;
	unsigned int nblocks = 0, nreqs = 0;

	mutex_lock(&inferos_lock);
	list_for_each_entry_safe(blk, btmp, &f->blocks, node) {
		WARN_ON_ONCE(blk->mapcount);
		release_block_locked(blk);
		nblocks++;
	}
	list_for_each_entry_safe(req, rtmp, &f->requests, node) {
		drop_request_locked(req);
		stats.aborted++;
		nreqs++;
	}
	list_del(&f->node);
	mutex_unlock(&inferos_lock);
	if (nblocks || nreqs)
		pr_debug("pid %d closed holding %u blocks, %u requests: released\n",
			 f->tgid, nblocks, nreqs);
	kfree(f);
	return 0;
}

static void inferos_vm_open(struct vm_area_struct *vma)
{
	struct inferos_block *blk = vma->vm_private_data;

	mutex_lock(&inferos_lock);
	blk->mapcount++;
	mutex_unlock(&inferos_lock);
}

static void inferos_vm_close(struct vm_area_struct *vma)
{
	struct inferos_block *blk = vma->vm_private_data;

	mutex_lock(&inferos_lock);
	blk->mapcount--;
	mutex_unlock(&inferos_lock);
}

static const struct vm_operations_struct inferos_vm_ops = {
	.open = inferos_vm_open,
	.close = inferos_vm_close,
};

/* mmap(2): offset = a block's offset (from ALLOC_PINNED) owned by this file, length <= its
 * size, MAP_SHARED.  Errors: EINVAL (not a block start, too long, not shared), EACCES (block of
 * another file).  The block cannot be freed while mapped (FREE_PINNED returns EBUSY). */
static int inferos_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct inferos_file *f = file->private_data;
	unsigned long len = vma->vm_end - vma->vm_start;
	struct inferos_block *blk;
	int ret;

	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	mutex_lock(&inferos_lock);
	blk = xa_load(&inferos_blocks, vma->vm_pgoff);
	if (!blk) {
		ret = -EINVAL;
	} else if (blk->owner != f) {
		ret = -EACCES;
	} else if (len > blk->size) {
		ret = -EINVAL;
	} else {
		ret = remap_vmalloc_range(vma, pool_base, vma->vm_pgoff);
		if (!ret) {
			inferos_vma_set_flags(vma, VM_DONTCOPY | VM_DONTEXPAND | VM_DONTDUMP);
			vma->vm_private_data = blk;
			vma->vm_ops = &inferos_vm_ops;
			blk->mapcount++;
		}
	}
	mutex_unlock(&inferos_lock);
	return ret;
}

/* ------------------------------------------------------------------ ioctls */

static void fill_gpu_status(struct inferos_gpu_status *st)
{
	struct sysinfo si;
	char names[128], *cur, *name;

	memset(st, 0, sizeof(*st));
	st->utilization_permille = INFEROS_UNAVAILABLE_U32;
	st->temperature_mc = INFEROS_UNAVAILABLE_S32;
	st->memory_used_bytes = INFEROS_UNAVAILABLE_U64;
	st->memory_total_bytes = INFEROS_UNAVAILABLE_U64;

	si_meminfo(&si);
	st->system_memory_total_bytes = (u64)si.totalram * si.mem_unit;
	st->system_memory_available_bytes = (u64)si_mem_available() << PAGE_SHIFT;
	st->flags |= INFEROS_GPU_HAS_SYSTEM_MEMORY;

#if IS_ENABLED(CONFIG_THERMAL)
	strscpy(names, thermal_zones ? thermal_zones : "", sizeof(names));
	cur = names;
	while ((name = strsep(&cur, ",")) != NULL) {
		struct thermal_zone_device *tz;
		int temp;

		if (!*name)
			continue;
		tz = thermal_zone_get_zone_by_name(name);
		if (IS_ERR_OR_NULL(tz))
			continue;
		if (thermal_zone_get_temp(tz, &temp))
			continue;
		st->temperature_mc = temp;
		strscpy(st->thermal_zone, name, sizeof(st->thermal_zone));
		st->flags |= INFEROS_GPU_HAS_TEMPERATURE;
		break;
	}
#endif
}

static void fill_memory_pool(struct inferos_memory_pool *mp)
{
	size_t largest = 0;
	size_t free_bytes;

	memset(mp, 0, sizeof(*mp));
	mutex_lock(&inferos_lock);
	gen_pool_for_each_chunk(pool, largest_free_chunk, &largest);
	free_bytes = pool_size - pool_used;
	mp->total_bytes = pool_size;
	mp->used_bytes = pool_used;
	mp->free_bytes = free_bytes;
	mp->largest_free_bytes = largest;
	mp->block_count = pool_blocks;
	mutex_unlock(&inferos_lock);
	mp->fragmentation_permille =
		free_bytes ? (u32)(1000 - div64_u64((u64)largest * 1000, free_bytes)) : 0;
}

static u32 count_processes_locked(void)
{
	struct inferos_file *f, *g;
	u32 n = 0;

	list_for_each_entry(f, &inferos_files, node) {
		bool seen = false;

		list_for_each_entry(g, &inferos_files, node) {
			if (g == f)
				break;
			if (g->tgid == f->tgid) {
				seen = true;
				break;
			}
		}
		if (!seen)
			n++;
	}
	return n;
}

static void fill_scheduler_stats(struct inferos_scheduler_stats *ss)
{
	struct inferos_file *f;

	memset(ss, 0, sizeof(*ss));
	mutex_lock(&inferos_lock);
	list_for_each_entry(f, &inferos_files, node)
		ss->open_handles++;
	ss->processes = count_processes_locked();
	ss->requests_in_flight = stats.in_flight;
	ss->requests_completed = stats.completed;
	ss->requests_aborted = stats.aborted;
	ss->tokens_completed = stats.tokens;
	ss->total_latency_us = stats.total_latency_us;
	mutex_unlock(&inferos_lock);
	ss->avg_latency_us = ss->requests_completed ?
		div64_u64(ss->total_latency_us, ss->requests_completed) : 0;
}

static long do_alloc(struct inferos_file *f, struct inferos_alloc __user *uarg)
{
	struct inferos_alloc a;
	struct inferos_block *blk;
	unsigned long addr;
	size_t size;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.size == 0 || a.size > pool_size)
		return -EINVAL;
	size = PAGE_ALIGN(a.size);
	blk = kzalloc(sizeof(*blk), GFP_KERNEL);
	if (!blk)
		return -ENOMEM;

	mutex_lock(&inferos_lock);
	addr = gen_pool_alloc(pool, size);
	if (!addr) {
		mutex_unlock(&inferos_lock);
		kfree(blk);
		return -ENOMEM;
	}
	blk->owner = f;
	blk->offset = addr - (unsigned long)pool_base;
	blk->size = size;
	if (xa_err(xa_store(&inferos_blocks, blk->offset >> PAGE_SHIFT, blk, GFP_KERNEL))) {
		gen_pool_free(pool, addr, size);
		mutex_unlock(&inferos_lock);
		kfree(blk);
		return -ENOMEM;
	}
	list_add_tail(&blk->node, &f->blocks);
	pool_used += size;
	pool_blocks++;
	mutex_unlock(&inferos_lock);

	/* No previous owner's data reaches the new owner.  Outside the lock: the offset is not
	 * known to user space before this ioctl returns. */
	memset((char *)pool_base + blk->offset, 0, size);

	a.size = size;
	a.offset = blk->offset;
	if (copy_to_user(uarg, &a, sizeof(a))) {
		mutex_lock(&inferos_lock);
		/* the caller may have guessed the offset and mapped it meanwhile */
		if (!blk->mapcount)
			release_block_locked(blk);
		mutex_unlock(&inferos_lock);
		return -EFAULT;
	}
	return 0;
}

static long do_free(struct inferos_file *f, struct inferos_free __user *uarg)
{
	struct inferos_free fr;
	struct inferos_block *blk;
	long ret = 0;

	if (copy_from_user(&fr, uarg, sizeof(fr)))
		return -EFAULT;
	if (fr.offset >= pool_size || !PAGE_ALIGNED(fr.offset))
		return -EINVAL;
	mutex_lock(&inferos_lock);
	blk = xa_load(&inferos_blocks, fr.offset >> PAGE_SHIFT);
	if (!blk)
		ret = -ENOENT;           /* never allocated, already freed, or not a block start */
	else if (blk->owner != f)
		ret = -EPERM;            /* another file's block */
	else if (blk->mapcount)
		ret = -EBUSY;            /* still mapped: munmap first */
	else
		release_block_locked(blk);
	mutex_unlock(&inferos_lock);
	return ret;
}

static long do_request_begin(struct inferos_file *f, struct inferos_request __user *uarg)
{
	struct inferos_request r = {};
	struct inferos_req *req = kzalloc(sizeof(*req), GFP_KERNEL);
	int err;

	if (!req)
		return -ENOMEM;
	req->owner = f;
	req->start = ktime_get();
	mutex_lock(&inferos_lock);
	err = xa_alloc_cyclic(&inferos_requests, &req->id, req, xa_limit_31b, &req_next, GFP_KERNEL);
	if (err < 0) {
		mutex_unlock(&inferos_lock);
		kfree(req);
		return err == -EBUSY ? -EAGAIN : err;
	}
	list_add_tail(&req->node, &f->requests);
	stats.in_flight++;
	mutex_unlock(&inferos_lock);

	r.handle = req->id;
	if (copy_to_user(uarg, &r, sizeof(r))) {
		mutex_lock(&inferos_lock);
		/* still ours unless a guessed handle was ended meanwhile */
		if (xa_load(&inferos_requests, r.handle) == req)
			drop_request_locked(req);
		mutex_unlock(&inferos_lock);
		return -EFAULT;
	}
	return 0;
}

static long do_request_end(struct inferos_file *f, struct inferos_request __user *uarg)
{
	struct inferos_request r;
	struct inferos_req *req;
	u64 latency_us;
	long ret = 0;

	if (copy_from_user(&r, uarg, sizeof(r)))
		return -EFAULT;
	if (r.reserved || (r.flags & ~INFEROS_REQ_KERNEL_TIME))
		return -EINVAL;
	if (!(r.flags & INFEROS_REQ_KERNEL_TIME) && r.latency_us > INFEROS_MAX_LATENCY_US)
		return -EINVAL;
	if (r.handle == 0 || r.handle > U32_MAX)
		return -ENOENT;
	mutex_lock(&inferos_lock);
	req = xa_load(&inferos_requests, (unsigned long)r.handle);
	if (!req) {
		ret = -ENOENT;
	} else if (req->owner != f) {
		ret = -EPERM;
	} else {
		latency_us = (r.flags & INFEROS_REQ_KERNEL_TIME) ?
			ktime_us_delta(ktime_get(), req->start) : r.latency_us;
		drop_request_locked(req);
		stats.completed++;
		stats.tokens += r.tokens;
		stats.total_latency_us += latency_us;
	}
	mutex_unlock(&inferos_lock);
	return ret;
}

static long inferos_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct inferos_file *f = file->private_data;
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case INFEROS_IOC_GET_GPU_STATUS: {
		struct inferos_gpu_status st;

		fill_gpu_status(&st);
		return copy_to_user(uarg, &st, sizeof(st)) ? -EFAULT : 0;
	}
	case INFEROS_IOC_GET_MEMORY_POOL: {
		struct inferos_memory_pool mp;

		fill_memory_pool(&mp);
		return copy_to_user(uarg, &mp, sizeof(mp)) ? -EFAULT : 0;
	}
	case INFEROS_IOC_GET_SCHEDULER_STATS: {
		struct inferos_scheduler_stats ss;

		fill_scheduler_stats(&ss);
		return copy_to_user(uarg, &ss, sizeof(ss)) ? -EFAULT : 0;
	}
	case INFEROS_IOC_ALLOC_PINNED:
		return do_alloc(f, uarg);
	case INFEROS_IOC_FREE_PINNED:
		return do_free(f, uarg);
	case INFEROS_IOC_REQUEST_BEGIN:
		return do_request_begin(f, uarg);
	case INFEROS_IOC_REQUEST_END:
		return do_request_end(f, uarg);
	case INFEROS_IOC_GET_INFO: {
		struct inferos_info info = {
			.abi_version = INFEROS_ABI_VERSION,
			.granularity_bytes = PAGE_SIZE,
			.pool_bytes = pool_size,
		};

		return copy_to_user(uarg, &info, sizeof(info)) ? -EFAULT : 0;
	}
	default:
		return -ENOTTY;          /* includes MAP_PINNED: Linux maps with mmap(2) */
	}
}

static const struct file_operations inferos_fops = {
	.owner = THIS_MODULE,
	.open = inferos_open,
	.release = inferos_release,
	.unlocked_ioctl = inferos_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = inferos_mmap,
	.llseek = noop_llseek,
};

static struct miscdevice inferos_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = INFEROS_DEVICE_NAME,
	.fops = &inferos_fops,
	.mode = 0660,
};

static int __init inferos_init(void)
{
	int ret;

	if (pool_size == 0 || pool_size > INFEROS_MAX_POOL || !PAGE_ALIGNED(pool_size)) {
		pr_err("pool_size=%lu rejected: must be a multiple of %lu in (0, %llu]\n",
		       pool_size, PAGE_SIZE, INFEROS_MAX_POOL);
		return -EINVAL;
	}
	pool_base = vmalloc_user(pool_size);
	if (!pool_base)
		return -ENOMEM;
	pool = gen_pool_create(PAGE_SHIFT, NUMA_NO_NODE);
	if (!pool) {
		ret = -ENOMEM;
		goto err_vfree;
	}
	ret = gen_pool_add(pool, (unsigned long)pool_base, pool_size, NUMA_NO_NODE);
	if (ret)
		goto err_pool;
	ret = misc_register(&inferos_misc);
	if (ret)
		goto err_pool;
	pr_info("/dev/%s ready: pool %lu bytes, ABI %d\n", INFEROS_DEVICE_NAME, pool_size,
		INFEROS_ABI_VERSION);
	return 0;

err_pool:
	gen_pool_destroy(pool);
err_vfree:
	vfree(pool_base);
	return ret;
}

static void __exit inferos_exit(void)
{
	misc_deregister(&inferos_misc);
	/* every file is closed (each holds a module reference), so nothing can remain */
	if (pool_used || pool_blocks || !xa_empty(&inferos_blocks) ||
	    !xa_empty(&inferos_requests) || !list_empty(&inferos_files))
		pr_err("leak at unload: %zu bytes in %u blocks still allocated\n",
		       pool_used, pool_blocks);
	else
		gen_pool_destroy(pool);
	xa_destroy(&inferos_blocks);
	xa_destroy(&inferos_requests);
	vfree(pool_base);
	pr_info("unloaded\n");
}

module_init(inferos_init);
module_exit(inferos_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("lemonade-inferos");
MODULE_DESCRIPTION("inferos: pinned memory pool and inference request accounting (/dev/inferos)");
MODULE_VERSION("0.1.0");

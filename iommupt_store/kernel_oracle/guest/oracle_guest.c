/*
 * The guest half of the kernel oracle: runs VFIO type1 map/unmap calls on one
 * device and reports what the kernel did, so the host can dump the IOMMU's
 * tables and replay the same calls into the iommupt-store engine.
 *
 * Usage: oracle_guest PLAN CONTROL_TTY GROUP
 *   PLAN lines:  "scenario NAME" | "map IOVA SIZE 4k|2m" | "unmap IOVA SIZE" | "end"
 *   Output on CONTROL_TTY, one record a line (all numbers hex):
 *     scenario NAME / pgsizes BITMAP / range FIRST LAST /
 *     map I ERRNO / run I PHYS BYTES (physically contiguous runs of a mapped buffer) /
 *     unmap I ERRNO BYTES / dump (then waits for one line from the host) / done
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <termios.h>
#include <unistd.h>
#include <linux/vfio.h>

#define PAGE 4096UL
#define HUGE (2UL << 20)
#define MAX_BUFS 4096

static FILE *out;
static FILE *ctl_in;

struct buf {
	void *addr;
	size_t len;
};
static struct buf bufs[MAX_BUFS];
static int nbufs;

static void die(const char *what)
{
	fprintf(out, "fatal %s %d\n", what, errno);
	fflush(out);
	exit(1);
}

static uint64_t page_phys(int pagemap, uintptr_t va)
{
	uint64_t entry;

	if (pread(pagemap, &entry, sizeof(entry), (off_t)(va / PAGE) * 8) != sizeof(entry))
		die("pagemap");
	if (!(entry & (1ULL << 63)))
		die("page-not-present");
	return (entry & ((1ULL << 55) - 1)) * PAGE;
}

/* Report the buffer as runs of physically contiguous pages, the pieces VFIO maps one by one. */
static void report_runs(unsigned int call, void *addr, size_t len)
{
	int pagemap = open("/proc/self/pagemap", O_RDONLY);
	uint64_t start = 0, next = 0, run = 0;

	if (pagemap < 0)
		die("open-pagemap");
	for (size_t off = 0; off < len; off += PAGE) {
		uint64_t pa = page_phys(pagemap, (uintptr_t)addr + off);

		if (run && pa == next) {
			run += PAGE;
		} else {
			if (run)
				fprintf(out, "run %x %llx %llx\n", call, (unsigned long long)start,
					(unsigned long long)run);
			start = pa;
			run = PAGE;
		}
		next = pa + PAGE;
	}
	if (run)
		fprintf(out, "run %x %llx %llx\n", call, (unsigned long long)start, (unsigned long long)run);
	close(pagemap);
}

static void *alloc_buffer(size_t len, int huge)
{
	void *addr;

	if (huge) {
		addr = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
	} else {
		addr = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (addr != MAP_FAILED)
			madvise(addr, len, MADV_NOHUGEPAGE);
	}
	if (addr == MAP_FAILED)
		die(huge ? "mmap-hugetlb" : "mmap");
	/*
	 * Scattered buffers fault their pages in from the top down, so they are not one physical run;
	 * hugetlb buffers bottom up, so neighbouring huge pages can form runs larger than 2M.
	 */
	if (huge) {
		for (size_t off = 0; off < len; off += HUGE)
			((volatile char *)addr)[off] = 1;
	} else {
		for (size_t off = len; off > 0;) {
			off -= PAGE;
			((volatile char *)addr)[off] = 1;
		}
	}
	if (nbufs == MAX_BUFS)
		die("too-many-buffers");
	bufs[nbufs].addr = addr;
	bufs[nbufs++].len = len;
	return addr;
}

static void report_info(int container)
{
	char raw[4096] = { 0 };
	struct vfio_iommu_type1_info *info = (void *)raw;
	struct vfio_info_cap_header *cap;

	info->argsz = sizeof(raw);
	if (ioctl(container, VFIO_IOMMU_GET_INFO, info))
		die("get-info");
	fprintf(out, "pgsizes %llx\n", (unsigned long long)info->iova_pgsizes);
	if (!(info->flags & VFIO_IOMMU_INFO_CAPS) || !info->cap_offset)
		return;
	for (uint32_t off = info->cap_offset; off; off = cap->next) {
		cap = (void *)(raw + off);
		if (cap->id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
			struct vfio_iommu_type1_info_cap_iova_range *r = (void *)cap;

			for (uint32_t i = 0; i < r->nr_iovas; i++)
				fprintf(out, "range %llx %llx\n", (unsigned long long)r->iova_ranges[i].start,
					(unsigned long long)r->iova_ranges[i].end);
		}
	}
}

static void wait_for_host(void)
{
	char line[64];

	fprintf(out, "dump\n");
	fflush(out);
	if (!fgets(line, sizeof(line), ctl_in))
		die("host-gone");
}

static void end_scenario(int *container, int *group)
{
	wait_for_host();
	close(*group);
	close(*container);
	*group = *container = -1;
	for (int i = 0; i < nbufs; i++)
		munmap(bufs[i].addr, bufs[i].len);
	nbufs = 0;
}

static void start_scenario(const char *group_path, int *container, int *group)
{
	struct vfio_group_status status = { .argsz = sizeof(status) };

	*container = open("/dev/vfio/vfio", O_RDWR);
	if (*container < 0)
		die("open-container");
	*group = open(group_path, O_RDWR);
	if (*group < 0)
		die("open-group");
	if (ioctl(*group, VFIO_GROUP_GET_STATUS, &status) || !(status.flags & VFIO_GROUP_FLAGS_VIABLE))
		die("group-not-viable");
	if (ioctl(*group, VFIO_GROUP_SET_CONTAINER, container))
		die("set-container");
	if (ioctl(*container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
		die("set-iommu");
	report_info(*container);
}

int main(int argc, char **argv)
{
	char line[256], name[200], kind[8];
	unsigned long long iova, size;
	unsigned int call = 0;
	int container = -1, group = -1;
	struct termios tio;
	FILE *plan;
	int ctl;

	if (argc != 4) {
		fprintf(stderr, "usage: %s PLAN CONTROL_TTY GROUP\n", argv[0]);
		return 2;
	}
	ctl = open(argv[2], O_RDWR | O_NOCTTY);
	if (ctl < 0) {
		perror(argv[2]);
		return 1;
	}
	/* raw: no echo of the host's replies, no newline translation */
	if (tcgetattr(ctl, &tio) == 0) {
		cfmakeraw(&tio);
		tcsetattr(ctl, TCSANOW, &tio);
	}
	out = fdopen(ctl, "w");
	ctl_in = fdopen(dup(ctl), "r");
	plan = fopen(argv[1], "r");
	if (!out || !ctl_in || !plan) {
		perror("open");
		return 1;
	}
	setvbuf(out, NULL, _IOLBF, 0);
	fprintf(out, "hello\n");
	while (fgets(line, sizeof(line), plan)) {
		if (sscanf(line, "scenario %199s", name) == 1) {
			start_scenario(argv[3], &container, &group);
			fprintf(out, "scenario %s\n", name);
			call = 0;
		} else if (sscanf(line, "map %llx %llx %7s", &iova, &size, kind) == 3) {
			int huge = strcmp(kind, "2m") == 0;
			size_t len = huge ? (size + HUGE - 1) / HUGE * HUGE : (size + PAGE - 1) / PAGE * PAGE;
			void *addr = alloc_buffer(len ? len : PAGE, huge);
			struct vfio_iommu_type1_dma_map map = {
				.argsz = sizeof(map),
				.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
				.vaddr = (uintptr_t)addr,
				.iova = iova,
				.size = size,
			};
			int rc = ioctl(container, VFIO_IOMMU_MAP_DMA, &map);

			fprintf(out, "map %x %x\n", call, rc ? errno : 0);
			if (!rc)
				report_runs(call, addr, size);
			call++;
		} else if (sscanf(line, "unmap %llx %llx", &iova, &size) == 2) {
			struct vfio_iommu_type1_dma_unmap unmap = {
				.argsz = sizeof(unmap),
				.iova = iova,
				.size = size,
			};
			int rc = ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap);

			fprintf(out, "unmap %x %x %llx\n", call, rc ? errno : 0,
				rc ? 0ULL : (unsigned long long)unmap.size);
			call++;
		} else if (strncmp(line, "end", 3) == 0) {
			end_scenario(&container, &group);
		}
	}
	fprintf(out, "done\n");
	fflush(out);
	return 0;
}

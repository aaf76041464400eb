/*
 * A stand-in for libamd_smi, for the FFI tests of collectors/src/nvml/amd.rs only: no AMD GPU
 * and no AMD SMI package exist on the build machines (Debian ships rocm-smi, not amdsmi).
 *
 * It exports the C ABI of the functions wattd calls, with the structures declared as AMD SMI's
 * public header (include/amd_smi/amdsmi.h, MIT licence, github.com/ROCm/amdsmi) declares them
 * for the library version chosen at compile time (-DAMDSMI_MAJOR=24|25|26|27), so that the C
 * compiler, not wattd's own arithmetic, decides each structure's size and offsets. What it
 * answers comes from a text file whose path is fixed at compile time (-DSTATE_FILE="..."),
 * re-read at every call:
 *
 *   energy <gpu> <accumulator>       the energy counter of GPU 0 or 1
 *   proc <gpu> <pid> <gfx_ns>        one process-list entry
 *   noperm                           the process list answers AMDSMI_STATUS_NO_PERM (24.x did
 *                                    when a process's name could not be read), list filled
 *   grow                             a list longer than the buffer answers SUCCESS (filled to
 *                                    the buffer, the count set to the whole list) instead of
 *                                    OUT_OF_RESOURCES, as when the list grew during the call
 *
 * -DPID_LIST_FORM adds amdsmi_get_gpu_process_info, as libraries before 24.6 had;
 * -DNO_VERSION leaves out amdsmi_get_lib_version, as libraries before 23.2 did.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#ifndef AMDSMI_MAJOR
#error "define AMDSMI_MAJOR"
#endif
#ifndef STATE_FILE
#error "define STATE_FILE"
#endif

#define SUCCESS 0
#define INVAL 1
#define NO_PERM 10
#define OUT_OF_RESOURCES 15
#define NOT_INIT 32
#define GPU_UUID_SIZE 38

#if AMDSMI_MAJOR <= 24
#define STRING_LENGTH 32
#else
#define STRING_LENGTH 256
#endif

typedef uint32_t amdsmi_status_t;
typedef void *amdsmi_socket_handle;
typedef void *amdsmi_processor_handle;

#if AMDSMI_MAJOR <= 25
typedef struct {
    uint32_t year;
    uint32_t major;
    uint32_t minor;
    uint32_t release;
    const char *build;
} amdsmi_version_t;
#else
typedef struct {
    uint32_t major;
    uint32_t minor;
    uint32_t release;
    const char *build;
} amdsmi_version_t;
#endif

typedef struct {
    char name[STRING_LENGTH];
    uint32_t pid;
    uint64_t mem;
    struct {
        uint64_t gfx;
        uint64_t enc;
        uint32_t reserved[12];
    } engine_usage;
    struct {
        uint64_t gtt_mem;
        uint64_t cpu_mem;
        uint64_t vram_mem;
        uint32_t reserved[10];
    } memory_usage;
    char container_name[STRING_LENGTH];
#if AMDSMI_MAJOR <= 24
    uint32_t reserved[4];
#else
    uint32_t cu_occupancy;
    uint32_t evicted_time;
    uint32_t reserved[10];
#endif
} amdsmi_proc_info_t;

#define MAX_PROCS 1000
static int initialised;
static int sock;
/* Two GPUs and, between them, a CPU: the processor list is filtered by type. */
static int processors[3];
static const uint32_t types[3] = {1, 2, 1};

struct state {
    uint64_t energy[2];
    uint32_t n[2];
    uint32_t pid[2][MAX_PROCS];
    uint64_t gfx[2][MAX_PROCS];
    int noperm;
    int grow;
};

static void load(struct state *s) {
    memset(s, 0, sizeof *s);
    FILE *f = fopen(STATE_FILE, "r");
    if (!f) return;
    char word[16];
    while (fscanf(f, "%15s", word) == 1) {
        unsigned g;
        if (!strcmp(word, "energy")) {
            unsigned long long acc;
            if (fscanf(f, "%u %llu", &g, &acc) == 2 && g < 2) s->energy[g] = acc;
        } else if (!strcmp(word, "proc")) {
            unsigned pid;
            unsigned long long ns;
            if (fscanf(f, "%u %u %llu", &g, &pid, &ns) == 3 && g < 2 && s->n[g] < MAX_PROCS) {
                s->pid[g][s->n[g]] = pid;
                s->gfx[g][s->n[g]] = ns;
                s->n[g]++;
            }
        } else if (!strcmp(word, "noperm")) {
            s->noperm = 1;
        } else if (!strcmp(word, "grow")) {
            s->grow = 1;
        }
    }
    fclose(f);
}

static int gpu_of(amdsmi_processor_handle h) {
    if (h == &processors[0]) return 0;
    if (h == &processors[2]) return 1;
    return -1;
}

amdsmi_status_t amdsmi_init(uint64_t flags) {
    if (!(flags & (1 << 1))) return INVAL;
    initialised = 1;
    return SUCCESS;
}

amdsmi_status_t amdsmi_shut_down(void) {
    initialised = 0;
    return SUCCESS;
}

#ifndef NO_VERSION
amdsmi_status_t amdsmi_get_lib_version(amdsmi_version_t *v) {
    if (!v) return INVAL;
    if (!initialised) return NOT_INIT;
#if AMDSMI_MAJOR <= 25
    v->year = AMDSMI_MAJOR;
    v->major = AMDSMI_MAJOR;
    v->minor = 7;
    v->release = 1;
#else
    v->major = AMDSMI_MAJOR;
    v->minor = 1;
    v->release = 2;
#endif
    v->build = "fake";
    return SUCCESS;
}
#endif

amdsmi_status_t amdsmi_status_code_to_string(amdsmi_status_t s, const char **out) {
    (void)s;
    *out = "fake status";
    return SUCCESS;
}

amdsmi_status_t amdsmi_get_socket_handles(uint32_t *count, amdsmi_socket_handle *h) {
    if (!initialised) return NOT_INIT;
    if (!h) {
        *count = 1;
        return SUCCESS;
    }
    if (*count >= 1) {
        h[0] = &sock;
        *count = 1;
    }
    return SUCCESS;
}

amdsmi_status_t amdsmi_get_processor_handles(amdsmi_socket_handle s, uint32_t *count,
                                             amdsmi_processor_handle *h) {
    if (!initialised || s != &sock) return INVAL;
    if (!h) {
        *count = 3;
        return SUCCESS;
    }
    uint32_t n = *count < 3 ? *count : 3;
    for (uint32_t i = 0; i < n; i++) h[i] = &processors[i];
    *count = n;
    return SUCCESS;
}

amdsmi_status_t amdsmi_get_processor_type(amdsmi_processor_handle h, uint32_t *t) {
    for (int i = 0; i < 3; i++) {
        if (h == &processors[i]) {
            *t = types[i];
            return SUCCESS;
        }
    }
    return INVAL;
}

amdsmi_status_t amdsmi_get_gpu_device_uuid(amdsmi_processor_handle h, unsigned int *len,
                                           char *uuid) {
    int g = gpu_of(h);
    if (g < 0 || !len || !uuid || *len < GPU_UUID_SIZE) return INVAL;
    snprintf(uuid, *len, "1f2e3d4c-0000-4000-8000-00000000030%d", g);
    return SUCCESS;
}

amdsmi_status_t amdsmi_get_energy_count(amdsmi_processor_handle h, uint64_t *acc, float *res,
                                        uint64_t *ts) {
    int g = gpu_of(h);
    if (g < 0 || !acc || !res || !ts) return INVAL;
    struct state s;
    load(&s);
    *acc = s.energy[g];
    *res = 15.2587890625f;
    *ts = 1;
    return SUCCESS;
}

amdsmi_status_t amdsmi_get_gpu_process_list(amdsmi_processor_handle h, uint32_t *max,
                                            amdsmi_proc_info_t *list) {
    int g = gpu_of(h);
    if (g < 0 || !max) return INVAL;
    static struct state s;
    load(&s);
    uint32_t n = s.n[g];
    if (*max == 0) {
        *max = n;
        return SUCCESS;
    }
    if (!list) return INVAL;
    uint32_t fill = n < *max ? n : *max;
    for (uint32_t i = 0; i < fill; i++) {
        memset(&list[i], 0x5a, sizeof list[i]);
        snprintf(list[i].name, sizeof list[i].name, "proc%u", s.pid[g][i]);
        list[i].pid = s.pid[g][i];
        list[i].engine_usage.gfx = s.gfx[g][i];
        list[i].engine_usage.enc = 0;
        list[i].container_name[0] = 0;
    }
    uint32_t had = *max;
    *max = n;
    if (n > had && !s.grow) return OUT_OF_RESOURCES;
    return s.noperm ? NO_PERM : SUCCESS;
}

#ifdef PID_LIST_FORM
amdsmi_status_t amdsmi_get_gpu_process_info(amdsmi_processor_handle h, uint32_t pid,
                                            amdsmi_proc_info_t *info) {
    (void)h;
    (void)pid;
    (void)info;
    return INVAL;
}
#endif

/*
 * A FAKE libnvidia-ml.so for llamaprobe's tests: no driver, no GPU, known answers.
 *
 * It exports the NVML functions that nvml-wrapper 0.13 calls for what llamaprobe reads (and
 * nvmlShutdown, which nvml-wrapper calls on drop and panics without), with the ABI of nvml.h:
 *
 *   nvmlInit_v2, nvmlShutdown, nvmlErrorString, nvmlSystemGetDriverVersion (read by
 *   nvml-wrapper's init), nvmlDeviceGetCount_v2, nvmlDeviceGetHandleByIndex_v2,
 *   nvmlDeviceGetName, nvmlDeviceGetUUID, nvmlDeviceGetUtilizationRates,
 *   nvmlDeviceGetMemoryInfo_v2, nvmlDeviceGetTemperature, nvmlDeviceGetPowerUsage,
 *   nvmlDeviceGetClockInfo, nvmlDeviceGetCurrentClocksThrottleReasons,
 *   nvmlDeviceGetComputeRunningProcesses_v3, nvmlDeviceGetGraphicsRunningProcesses_v3.
 *
 * Two GPUs:
 *   0: "Fake GPU 0", GPU-00000000-1111-2222-3333-444444444444, utilization 37 %, memory
 *      3 GiB used of 16 GiB, 61 C, 123456 mW, SM clock 1410 MHz, throttle reasons 0x5
 *      (GPU idle | SW power cap); compute processes: $FAKE_NVML_PID with 512 MiB and pid
 *      4194999 (beyond pid_max: never traced) with 1 GiB; graphics processes: $FAKE_NVML_PID
 *      with 512 MiB (the same process in both lists).
 *   1: "Fake GPU 1", GPU-11111111-2222-3333-4444-555555555555, utilization 5 %, memory
 *      1 GiB used of 8 GiB, 40 C, 35000 mW, SM clock 210 MHz, throttle reasons 0; no process.
 *
 * FAKE_NVML_FAIL is a comma-separated list of calls that return NVML_ERROR_NOT_SUPPORTED:
 *   init (then NVML_ERROR_DRIVER_NOT_LOADED), utilization, memory, temperature, power, clock,
 *   throttle, processes (both lists), name, uuid.
 *
 * Build: gcc -shared -fPIC -o libnvidia-ml.so.1 fake_nvml.c
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
};

typedef struct fake_device {
    const char *name;
    const char *uuid;
    unsigned int utilization_gpu, utilization_memory;
    unsigned long long memory_total, memory_used;
    unsigned int temperature, power_mw, sm_clock_mhz;
    unsigned long long throttle;
} fake_device;

typedef fake_device *nvmlDevice_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

/* nvmlProcessInfo_t of the _v3 process-list functions (nvmlProcessInfo_v2_t). */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

#define GIB (1024ULL * 1024 * 1024)
#define MIB (1024ULL * 1024)
#define NO_ID 0xFFFFFFFFu
#define OTHER_PID 4194999u

static fake_device devices[2] = {
    {"Fake GPU 0", "GPU-00000000-1111-2222-3333-444444444444", 37, 20, 16 * GIB, 3 * GIB, 61,
     123456, 1410, 0x5},
    {"Fake GPU 1", "GPU-11111111-2222-3333-4444-555555555555", 5, 1, 8 * GIB, 1 * GIB, 40,
     35000, 210, 0},
};

/* NVML counts initialisations: each nvmlInit needs its nvmlShutdown. */
static int initialised;

/* True if `what` is in $FAKE_NVML_FAIL. */
static int fails(const char *what) {
    const char *list = getenv("FAKE_NVML_FAIL");
    size_t n = strlen(what);
    while (list && *list) {
        const char *end = strchr(list, ',');
        size_t len = end ? (size_t)(end - list) : strlen(list);
        if (len == n && strncmp(list, what, n) == 0)
            return 1;
        list = end ? end + 1 : NULL;
    }
    return 0;
}

static int valid(nvmlDevice_t d) {
    return initialised && (d == &devices[0] || d == &devices[1]);
}

static nvmlReturn_t copy_string(const char *s, char *out, unsigned int size) {
    if (!out || size == 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(s) + 1 > size)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, s);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) {
    if (fails("init"))
        return NVML_ERROR_DRIVER_NOT_LOADED;
    initialised++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void) {
    if (!initialised)
        return NVML_ERROR_UNINITIALIZED;
    initialised--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    default: return "Fake NVML error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    return copy_string("555.42.02", version, length);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialised)
        return NVML_ERROR_UNINITIALIZED;
    *count = 2;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!initialised)
        return NVML_ERROR_UNINITIALIZED;
    if (index >= 2 || !device)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
    if (!valid(d)) return NVML_ERROR_INVALID_ARGUMENT;
    if (fails("name")) return NVML_ERROR_NOT_SUPPORTED;
    return copy_string(d->name, name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
    if (!valid(d)) return NVML_ERROR_INVALID_ARGUMENT;
    if (fails("uuid")) return NVML_ERROR_NOT_SUPPORTED;
    return copy_string(d->uuid, uuid, length);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
    if (!valid(d) || !u) return NVML_ERROR_INVALID_ARGUMENT;
    if (fails("utilization")) return NVML_ERROR_NOT_SUPPORTED;
    u->gpu = d->utilization_gpu;
    u->memory = d->utilization_memory;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    if (!valid(d) || !m) return NVML_ERROR_INVALID_ARGUMENT;
    /* NVML_STRUCT_VERSION(Memory, 2) */
    if (m->version != (unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))
        return NVML_ERROR_INVALID_ARGUMENT;
    if (fails("memory")) return NVML_ERROR_NOT_SUPPORTED;
    m->total = d->memory_total;
    m->used = d->memory_used;
    m->reserved = 0;
    m->free = d->memory_total - d->memory_used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *temp) {
    if (!valid(d) || !temp || sensor != 0 /* NVML_TEMPERATURE_GPU */)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (fails("temperature")) return NVML_ERROR_NOT_SUPPORTED;
    *temp = d->temperature;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *power) {
    if (!valid(d) || !power) return NVML_ERROR_INVALID_ARGUMENT;
    if (fails("power")) return NVML_ERROR_NOT_SUPPORTED;
    *power = d->power_mw;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned int *clock) {
    if (!valid(d) || !clock || type != 1 /* NVML_CLOCK_SM */)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (fails("clock")) return NVML_ERROR_NOT_SUPPORTED;
    *clock = d->sm_clock_mhz;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t d,
                                                       unsigned long long *reasons) {
    if (!valid(d) || !reasons) return NVML_ERROR_INVALID_ARGUMENT;
    if (fails("throttle")) return NVML_ERROR_NOT_SUPPORTED;
    *reasons = d->throttle;
    return NVML_SUCCESS;
}

/* The process-list protocol: with *count too small (0 to ask), set *count and return
 * INSUFFICIENT_SIZE; with room, fill, set *count and return SUCCESS. */
static nvmlReturn_t processes(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *infos,
                              int graphics) {
    if (!valid(d) || !count) return NVML_ERROR_INVALID_ARGUMENT;
    if (fails("processes")) return NVML_ERROR_NOT_SUPPORTED;
    nvmlProcessInfo_t list[2];
    unsigned int n = 0;
    const char *pid = getenv("FAKE_NVML_PID");
    if (d == &devices[0] && pid && *pid) {
        list[n++] = (nvmlProcessInfo_t){(unsigned int)strtoul(pid, NULL, 10), 512 * MIB, NO_ID,
                                        NO_ID};
        if (!graphics)
            list[n++] = (nvmlProcessInfo_t){OTHER_PID, 1 * GIB, NO_ID, NO_ID};
    }
    if (*count < n) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (n > 0 && !infos) return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < n; i++)
        infos[i] = list[i];
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
    return processes(d, count, infos, 0);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t d, unsigned int *count,
                                                      nvmlProcessInfo_t *infos) {
    return processes(d, count, infos, 1);
}

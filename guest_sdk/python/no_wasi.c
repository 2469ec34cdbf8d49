/*
 * no_wasi.c - every WASI function wasi-libc would import, defined inside the guest.
 *
 * CPython calls libc, and wasi-libc turns files, clocks and entropy into imports of
 * `wasi_snapshot_preview1`, which an ABI v1 guest does not have. Defining each `__wasi_*`
 * function here (the whole set of wasi-libc's __wasilibc_real.c, so that file is never
 * linked) keeps the module importing only `torpor`:
 *  - no files: no preopened directory, every path call is ENOSYS or EBADF; fds 0-2 are
 *    character devices, reads of 0 are end-of-file, what C code writes to 1 and 2 is
 *    logged as warnings (torpor.py sends Python's print() to the log line by line);
 *  - no clock: time is 0 (real time is the journaled clock.now tool, as for every guest);
 *  - entropy: a xorshift stream seeded from the agent's seed at spawn (runtime.c), so
 *    os.urandom, the `random` module and uuid4 differ per agent and replay exactly;
 *  - exit: the agent fails (abort) instead of leaving the host.
 * Generated once from wasi-libc's signatures; the defaults say ENOSYS.
 */
#include <stdint.h>
#include <errno.h>
#include <string.h>
#include <wasi/api.h>

__attribute__((import_module("torpor"), import_name("log")))
int32_t torpor_sys_log(int32_t level, const void *ptr, int32_t len);
__attribute__((import_module("torpor"), import_name("abort")))
_Noreturn void torpor_sys_abort(int32_t kind, const void *msg, int32_t len);

static uint64_t entropy = 0x9E3779B97F4A7C15ULL;

void torpor_py_seed_entropy(uint64_t seed) { entropy = seed ? seed : 0x9E3779B97F4A7C15ULL; }

static uint64_t next_entropy(void) {
    uint64_t x = entropy;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    entropy = x;
    return x * 0x2545F4914F6CDD1DULL;
}

int32_t __imported_wasi_snapshot_preview1_args_get(int32_t arg0, int32_t arg1) {
    uint8_t * * argv = (uint8_t * *)arg0;
    uint8_t * argv_buf = (uint8_t *)arg1;
    (void)argv; (void)argv_buf; return 0;
}

int32_t __imported_wasi_snapshot_preview1_args_sizes_get(int32_t arg0, int32_t arg1) {
    __wasi_size_t * retptr0 = (__wasi_size_t *)arg0;
    __wasi_size_t * retptr1 = (__wasi_size_t *)arg1;
    *retptr0 = 0; *retptr1 = 0; return 0;
}

int32_t __imported_wasi_snapshot_preview1_environ_get(int32_t arg0, int32_t arg1) {
    uint8_t * * environ = (uint8_t * *)arg0;
    uint8_t * environ_buf = (uint8_t *)arg1;
    (void)environ; (void)environ_buf; return 0;
}

int32_t __imported_wasi_snapshot_preview1_environ_sizes_get(int32_t arg0, int32_t arg1) {
    __wasi_size_t * retptr0 = (__wasi_size_t *)arg0;
    __wasi_size_t * retptr1 = (__wasi_size_t *)arg1;
    *retptr0 = 0; *retptr1 = 0; return 0;
}

int32_t __imported_wasi_snapshot_preview1_clock_res_get(int32_t arg0, int32_t arg1) {
    __wasi_clockid_t id = (__wasi_clockid_t)arg0;
    __wasi_timestamp_t * retptr0 = (__wasi_timestamp_t *)arg1;
    (void)id; *retptr0 = 1000; return 0;
}

int32_t __imported_wasi_snapshot_preview1_clock_time_get(int32_t arg0, int64_t arg1, int32_t arg2) {
    __wasi_clockid_t id = (__wasi_clockid_t)arg0;
    __wasi_timestamp_t precision = (__wasi_timestamp_t)arg1;
    __wasi_timestamp_t * retptr0 = (__wasi_timestamp_t *)arg2;
    (void)id; (void)precision; *retptr0 = 0; return 0;
}

int32_t __imported_wasi_snapshot_preview1_fd_advise(int32_t arg0, int64_t arg1, int64_t arg2, int32_t arg3) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_filesize_t offset = (__wasi_filesize_t)arg1;
    __wasi_filesize_t len = (__wasi_filesize_t)arg2;
    __wasi_advice_t advice = (__wasi_advice_t)arg3;
    (void)fd; (void)offset; (void)len; (void)advice; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_allocate(int32_t arg0, int64_t arg1, int64_t arg2) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_filesize_t offset = (__wasi_filesize_t)arg1;
    __wasi_filesize_t len = (__wasi_filesize_t)arg2;
    (void)fd; (void)offset; (void)len; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_close(int32_t arg0) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    return fd > 2 ? __WASI_ERRNO_BADF : 0;
}

int32_t __imported_wasi_snapshot_preview1_fd_datasync(int32_t arg0) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    (void)fd; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_fdstat_get(int32_t arg0, int32_t arg1) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_fdstat_t * retptr0 = (__wasi_fdstat_t *)arg1;
    if (fd > 2) return __WASI_ERRNO_BADF;
    memset(retptr0, 0, sizeof *retptr0);
    retptr0->fs_filetype = __WASI_FILETYPE_CHARACTER_DEVICE;
    retptr0->fs_rights_base = fd == 0 ? __WASI_RIGHTS_FD_READ : __WASI_RIGHTS_FD_WRITE;
    return 0;
}

int32_t __imported_wasi_snapshot_preview1_fd_fdstat_set_flags(int32_t arg0, int32_t arg1) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_fdflags_t flags = (__wasi_fdflags_t)arg1;
    (void)fd; (void)flags; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_fdstat_set_rights(int32_t arg0, int64_t arg1, int64_t arg2) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_rights_t fs_rights_base = (__wasi_rights_t)arg1;
    __wasi_rights_t fs_rights_inheriting = (__wasi_rights_t)arg2;
    (void)fd; (void)fs_rights_base; (void)fs_rights_inheriting; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_filestat_get(int32_t arg0, int32_t arg1) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_filestat_t * retptr0 = (__wasi_filestat_t *)arg1;
    if (fd > 2) return __WASI_ERRNO_BADF;
    memset(retptr0, 0, sizeof *retptr0);
    retptr0->filetype = __WASI_FILETYPE_CHARACTER_DEVICE;
    return 0;
}

int32_t __imported_wasi_snapshot_preview1_fd_filestat_set_size(int32_t arg0, int64_t arg1) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_filesize_t size = (__wasi_filesize_t)arg1;
    (void)fd; (void)size; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_filestat_set_times(int32_t arg0, int64_t arg1, int64_t arg2, int32_t arg3) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_timestamp_t atim = (__wasi_timestamp_t)arg1;
    __wasi_timestamp_t mtim = (__wasi_timestamp_t)arg2;
    __wasi_fstflags_t fst_flags = (__wasi_fstflags_t)arg3;
    (void)fd; (void)atim; (void)mtim; (void)fst_flags; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_pread(int32_t arg0, int32_t arg1, int32_t arg2, int64_t arg3, int32_t arg4) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    const __wasi_iovec_t * iovs = (const __wasi_iovec_t *)arg1;
    size_t iovs_len = (size_t)arg2;
    __wasi_filesize_t offset = (__wasi_filesize_t)arg3;
    __wasi_size_t * retptr0 = (__wasi_size_t *)arg4;
    (void)fd; (void)iovs; (void)iovs_len; (void)offset; (void)retptr0; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_prestat_get(int32_t arg0, int32_t arg1) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_prestat_t * retptr0 = (__wasi_prestat_t *)arg1;
    (void)fd; (void)retptr0; return __WASI_ERRNO_BADF; /* no preopened directories */
}

int32_t __imported_wasi_snapshot_preview1_fd_prestat_dir_name(int32_t arg0, int32_t arg1, int32_t arg2) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    uint8_t * path = (uint8_t *)arg1;
    __wasi_size_t path_len = (__wasi_size_t)arg2;
    (void)fd; (void)path; (void)path_len; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_pwrite(int32_t arg0, int32_t arg1, int32_t arg2, int64_t arg3, int32_t arg4) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    const __wasi_ciovec_t * iovs = (const __wasi_ciovec_t *)arg1;
    size_t iovs_len = (size_t)arg2;
    __wasi_filesize_t offset = (__wasi_filesize_t)arg3;
    __wasi_size_t * retptr0 = (__wasi_size_t *)arg4;
    (void)fd; (void)iovs; (void)iovs_len; (void)offset; (void)retptr0; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_read(int32_t arg0, int32_t arg1, int32_t arg2, int32_t arg3) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    const __wasi_iovec_t * iovs = (const __wasi_iovec_t *)arg1;
    size_t iovs_len = (size_t)arg2;
    __wasi_size_t * retptr0 = (__wasi_size_t *)arg3;
    if (fd != 0) return __WASI_ERRNO_BADF;
    (void)iovs; (void)iovs_len;
    *retptr0 = 0; /* end of file: there is no standard input */
    return 0;
}

int32_t __imported_wasi_snapshot_preview1_fd_readdir(int32_t arg0, int32_t arg1, int32_t arg2, int64_t arg3, int32_t arg4) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    uint8_t * buf = (uint8_t *)arg1;
    __wasi_size_t buf_len = (__wasi_size_t)arg2;
    __wasi_dircookie_t cookie = (__wasi_dircookie_t)arg3;
    __wasi_size_t * retptr0 = (__wasi_size_t *)arg4;
    (void)fd; (void)buf; (void)buf_len; (void)cookie; (void)retptr0; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_renumber(int32_t arg0, int32_t arg1) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_fd_t to = (__wasi_fd_t)arg1;
    (void)fd; (void)to; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_seek(int32_t arg0, int64_t arg1, int32_t arg2, int32_t arg3) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_filedelta_t offset = (__wasi_filedelta_t)arg1;
    __wasi_whence_t whence = (__wasi_whence_t)arg2;
    __wasi_filesize_t * retptr0 = (__wasi_filesize_t *)arg3;
    (void)offset; (void)whence; (void)retptr0;
    return fd > 2 ? __WASI_ERRNO_BADF : __WASI_ERRNO_SPIPE;
}

int32_t __imported_wasi_snapshot_preview1_fd_sync(int32_t arg0) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    (void)fd; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_fd_tell(int32_t arg0, int32_t arg1) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_filesize_t * retptr0 = (__wasi_filesize_t *)arg1;
    (void)retptr0;
    return fd > 2 ? __WASI_ERRNO_BADF : __WASI_ERRNO_SPIPE;
}

int32_t __imported_wasi_snapshot_preview1_fd_write(int32_t arg0, int32_t arg1, int32_t arg2, int32_t arg3) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    const __wasi_ciovec_t * iovs = (const __wasi_ciovec_t *)arg1;
    size_t iovs_len = (size_t)arg2;
    __wasi_size_t * retptr0 = (__wasi_size_t *)arg3;
    if (fd != 1 && fd != 2) return __WASI_ERRNO_BADF;
    size_t n = 0;
    for (size_t i = 0; i < iovs_len; i++) {
        if (iovs[i].buf_len) torpor_sys_log(2, iovs[i].buf, (int32_t)(iovs[i].buf_len > 65536 ? 65536 : iovs[i].buf_len));
        n += iovs[i].buf_len;
    }
    *retptr0 = (__wasi_size_t)n;
    return 0;
}

int32_t __imported_wasi_snapshot_preview1_path_create_directory(int32_t arg0, int32_t arg1, int32_t arg2) {
    (void)arg0; (void)arg1; (void)arg2; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_path_filestat_get(int32_t arg0, int32_t arg1, int32_t arg2, int32_t arg3, int32_t arg4) {
    (void)arg0; (void)arg1; (void)arg2; (void)arg3; (void)arg4; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_path_filestat_set_times(int32_t arg0, int32_t arg1, int32_t arg2, int32_t arg3, int64_t arg4, int64_t arg5, int32_t arg6) {
    (void)arg0; (void)arg1; (void)arg2; (void)arg3; (void)arg4; (void)arg5; (void)arg6; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_path_link(int32_t arg0, int32_t arg1, int32_t arg2, int32_t arg3, int32_t arg4, int32_t arg5, int32_t arg6) {
    (void)arg0; (void)arg1; (void)arg2; (void)arg3; (void)arg4; (void)arg5; (void)arg6; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_path_open(int32_t arg0, int32_t arg1, int32_t arg2, int32_t arg3, int32_t arg4, int64_t arg5, int64_t arg6, int32_t arg7, int32_t arg8) {
    (void)arg0; (void)arg1; (void)arg2; (void)arg3; (void)arg4; (void)arg5; (void)arg6; (void)arg7; (void)arg8; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_path_readlink(int32_t arg0, int32_t arg1, int32_t arg2, int32_t arg3, int32_t arg4, int32_t arg5) {
    (void)arg0; (void)arg1; (void)arg2; (void)arg3; (void)arg4; (void)arg5; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_path_remove_directory(int32_t arg0, int32_t arg1, int32_t arg2) {
    (void)arg0; (void)arg1; (void)arg2; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_path_rename(int32_t arg0, int32_t arg1, int32_t arg2, int32_t arg3, int32_t arg4, int32_t arg5) {
    (void)arg0; (void)arg1; (void)arg2; (void)arg3; (void)arg4; (void)arg5; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_path_symlink(int32_t arg0, int32_t arg1, int32_t arg2, int32_t arg3, int32_t arg4) {
    (void)arg0; (void)arg1; (void)arg2; (void)arg3; (void)arg4; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_path_unlink_file(int32_t arg0, int32_t arg1, int32_t arg2) {
    (void)arg0; (void)arg1; (void)arg2; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_poll_oneoff(int32_t arg0, int32_t arg1, int32_t arg2, int32_t arg3) {
    const __wasi_subscription_t * in = (const __wasi_subscription_t *)arg0;
    __wasi_event_t * out = (__wasi_event_t *)arg1;
    __wasi_size_t nsubscriptions = (__wasi_size_t)arg2;
    __wasi_size_t * retptr0 = (__wasi_size_t *)arg3;
    (void)in; (void)out; (void)nsubscriptions; (void)retptr0; return __WASI_ERRNO_NOSYS;
}

_Noreturn void __imported_wasi_snapshot_preview1_proc_exit(int32_t arg0) {
    __wasi_exitcode_t rval = (__wasi_exitcode_t)arg0;
    static const char msg[] = "the Python runtime exited";
    (void)rval;
    torpor_sys_abort(0, msg, (int32_t)(sizeof msg - 1));
}

int32_t __imported_wasi_snapshot_preview1_sched_yield(void) {
    return 0;
}

int32_t __imported_wasi_snapshot_preview1_random_get(int32_t arg0, int32_t arg1) {
    uint8_t * buf = (uint8_t *)arg0;
    __wasi_size_t buf_len = (__wasi_size_t)arg1;
    for (__wasi_size_t i = 0; i < buf_len; i++) buf[i] = (uint8_t)(next_entropy() >> 56);
    return 0;
}

int32_t __imported_wasi_snapshot_preview1_sock_accept(int32_t arg0, int32_t arg1, int32_t arg2) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_fdflags_t flags = (__wasi_fdflags_t)arg1;
    __wasi_fd_t * retptr0 = (__wasi_fd_t *)arg2;
    (void)fd; (void)flags; (void)retptr0; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_sock_recv(int32_t arg0, int32_t arg1, int32_t arg2, int32_t arg3, int32_t arg4, int32_t arg5) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    const __wasi_iovec_t * ri_data = (const __wasi_iovec_t *)arg1;
    size_t ri_data_len = (size_t)arg2;
    __wasi_riflags_t ri_flags = (__wasi_riflags_t)arg3;
    __wasi_size_t * retptr0 = (__wasi_size_t *)arg4;
    __wasi_roflags_t * retptr1 = (__wasi_roflags_t *)arg5;
    (void)fd; (void)ri_data; (void)ri_data_len; (void)ri_flags; (void)retptr0; (void)retptr1; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_sock_send(int32_t arg0, int32_t arg1, int32_t arg2, int32_t arg3, int32_t arg4) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    const __wasi_ciovec_t * si_data = (const __wasi_ciovec_t *)arg1;
    size_t si_data_len = (size_t)arg2;
    __wasi_siflags_t si_flags = (__wasi_siflags_t)arg3;
    __wasi_size_t * retptr0 = (__wasi_size_t *)arg4;
    (void)fd; (void)si_data; (void)si_data_len; (void)si_flags; (void)retptr0; return __WASI_ERRNO_NOSYS;
}

int32_t __imported_wasi_snapshot_preview1_sock_shutdown(int32_t arg0, int32_t arg1) {
    __wasi_fd_t fd = (__wasi_fd_t)arg0;
    __wasi_sdflags_t how = (__wasi_sdflags_t)arg1;
    (void)fd; (void)how; return __WASI_ERRNO_NOSYS;
}

/* Zig's own close() (written in Zig) calls the WASI import directly, past the names
 * above: close() is defined here instead, over the same function. */
int close(int fd) {
    int32_t rc = __imported_wasi_snapshot_preview1_fd_close(fd);
    if (rc != 0) { errno = rc; return -1; }
    return 0;
}

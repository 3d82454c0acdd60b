//! How a daemon holding a large cache keeps its resident memory close to what it uses.
//!
//! glibc's allocator serves a request above its mmap threshold (128 KiB at start) with a
//! mapping of its own, given back to the system when freed. By default the threshold then moves
//! up to the size of each such block freed (up to 32 MiB), so after a daemon's first lists
//! (pages of etcd values, responses, a `Vec` growing to hold 100,000 objects) those buffers come
//! from the heap instead, between the small objects the cache keeps, and leave holes there that
//! no trim can return. Measured on a controller holding 100,000 volumes: 2,750 bytes resident a
//! volume with the moving threshold, 2,240 with it fixed (`bench/README.md`, section 16).

/// Fixes glibc's mmap threshold at its starting value, so large transient buffers are always
/// mapped on their own and returned when freed. Call once, first thing in `main`. Nothing to do
/// on other allocators.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of the allocator; setting M_MMAP_THRESHOLD also turns
    // off its dynamic adjustment (mallopt(3)).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Gives the memory a large wave freed back to the operating system. Between the objects a
/// cache keeps, a wave over 100,000 of them frees queue entries, keys and the temporaries of
/// every reconcile; glibc's allocator keeps those pages resident (~270 bytes a volume, measured
/// on a controller holding 100,000), `malloc_trim` returns them. Once a wave: it walks the heap,
/// a few milliseconds.
pub(crate) fn release_after_wave() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only releases memory that is free.
    unsafe {
        libc::malloc_trim(0);
    }
}

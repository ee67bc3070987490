//! Returning freed heap memory to the operating system.
//!
//! Loading a tokenizer builds ~100,000 small strings twice over and drops the first copy;
//! the allocator keeps those freed pages, and the OS counts them as the app's memory (an iOS
//! keyboard extension is stopped at about 77 MB of it). [`release_free_heap`] asks the
//! platform's allocator to give free pages back after such one-off work.

/// Hands the allocator's free pages back to the OS: glibc `malloc_trim`, Android (bionic)
/// `mallopt(M_PURGE)`, Apple `malloc_zone_pressure_relief`; nothing elsewhere. Live
/// allocations are untouched; the call only costs time (a few ms), so use it after large
/// one-off work, not in a loop.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's heap to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    #[cfg(target_os = "android")]
    {
        // bionic's `mallopt(M_PURGE, 0)` (API 28+). Looked up at run time: a library that
        // linked it directly would fail to load on Android versions without it.
        const M_PURGE: libc::c_int = -101;
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
        let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"mallopt".as_ptr()) };
        if !f.is_null() {
            // SAFETY: bionic's mallopt has this signature; M_PURGE takes no pointers and only
            // releases free pages (older versions return 0 for an unknown option).
            unsafe {
                let mallopt: extern "C" fn(libc::c_int, libc::c_int) -> libc::c_int =
                    std::mem::transmute(f);
                mallopt(M_PURGE, 0);
            }
        }
    }
    #[cfg(target_vendor = "apple")]
    {
        extern "C" {
            fn malloc_zone_pressure_relief(zone: *mut libc::c_void, goal: usize) -> usize;
        }
        // SAFETY: a null zone means every zone; goal 0 asks for as much as possible. Only free
        // pages are released.
        unsafe {
            malloc_zone_pressure_relief(std::ptr::null_mut(), 0);
        }
    }
}

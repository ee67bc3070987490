/* Minimal <assert.h> for cross-compiling ring's C code without the NDK.
 * Same expansion as bionic's: failures call __assert2 from libc. */
#undef assert
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
void __assert2(const char *__file, int __line, const char *__function, const char *__msg)
    __attribute__((__noreturn__));
#define assert(e) ((e) ? (void)0 : __assert2(__FILE__, __LINE__, __func__, #e))
#endif

/* Minimal <assert.h> for cross-compiling ring's C code without Xcode.
 * Same expansion as Apple's: failures call __assert_rtn from libSystem. */
#undef assert
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
void __assert_rtn(const char *__func, const char *__file, int __line, const char *__expr)
    __attribute__((__noreturn__));
#define assert(e) ((e) ? (void)0 : __assert_rtn(__func__, __FILE__, __LINE__, #e))
#endif

/* Minimal <string.h> for cross-compiling ring's C code without the NDK.
 * Declarations match bionic; the symbols resolve against libc.so when the app links. */
#ifndef SPA_MIN_STRING_H
#define SPA_MIN_STRING_H
#include <stddef.h>
void *memcpy(void *__dst, const void *__src, size_t __n);
void *memmove(void *__dst, const void *__src, size_t __n);
void *memset(void *__dst, int __c, size_t __n);
int memcmp(const void *__lhs, const void *__rhs, size_t __n);
size_t strlen(const char *__s);
#endif

/* Minimal <stdlib.h> for cross-compiling ring's C code without Xcode (libSystem declarations). */
#ifndef SPA_MIN_STDLIB_H
#define SPA_MIN_STDLIB_H
#include <stddef.h>
void abort(void) __attribute__((__noreturn__));
void *malloc(size_t __n);
void free(void *__p);
#endif

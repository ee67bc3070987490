/* Minimal <TargetConditionals.h> for cross-compiling C code for iOS devices (arm64) without Xcode. */
#ifndef SPA_MIN_TARGET_CONDITIONALS_H
#define SPA_MIN_TARGET_CONDITIONALS_H
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 0
#define TARGET_OS_IPHONE 1
#define TARGET_OS_IOS 1
#define TARGET_OS_TV 0
#define TARGET_OS_WATCH 0
#define TARGET_OS_VISION 0
#define TARGET_OS_MACCATALYST 0
#define TARGET_OS_SIMULATOR 0
#define TARGET_CPU_ARM64 1
#endif

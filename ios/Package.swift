// swift-tools-version:5.9
// SpaMobile: the Swift package of spa-mobile (Side Plugin Adaptation SDK).
//
//   SpaMobileFFIFFI  binary target: the Rust core (libspa_ffi.a for iOS devices and the simulator)
//                    with its C header + module map, built by scripts/build-xcframework.sh
//   SpaMobileFFI     the UniFFI-generated Swift bindings (Sources/SpaMobileFFI)
//   SpaMobile        the idiomatic wrapper apps import (async/await, AsyncThrowingStream)
//
// Where the binary target comes from:
//   - a release: `releaseURL` + `releaseChecksum`, written by
//     `scripts/build-xcframework.sh --release-url URL` into the published copy of this file;
//   - a local build: while `releaseChecksum` is empty (as committed here), or with
//     SPA_LOCAL_XCFRAMEWORK=1, build/SpaMobileFFIFFI.xcframework left by scripts/build-xcframework.sh.
// Tests/SpaMobileLinuxTests is compiled with swiftc by scripts/test-ffi.sh, not by SwiftPM.
import PackageDescription

let releaseURL = ""
let releaseChecksum = ""

let useLocalFramework = releaseChecksum.isEmpty || Context.environment["SPA_LOCAL_XCFRAMEWORK"] == "1"

let core: Target = useLocalFramework
    ? .binaryTarget(name: "SpaMobileFFIFFI", path: "build/SpaMobileFFIFFI.xcframework")
    : .binaryTarget(name: "SpaMobileFFIFFI", url: releaseURL, checksum: releaseChecksum)

let package = Package(
    name: "SpaMobile",
    platforms: [.iOS(.v14)],
    products: [
        .library(name: "SpaMobile", targets: ["SpaMobile"]),
    ],
    targets: [
        core,
        .target(
            name: "SpaMobileFFI",
            dependencies: ["SpaMobileFFIFFI"],
            path: "Sources/SpaMobileFFI"
        ),
        .target(
            name: "SpaMobile",
            dependencies: ["SpaMobileFFI"],
            path: "Sources/SpaMobile"
        ),
    ]
)

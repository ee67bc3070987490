// spa-mobile Android library: the UniFFI Kotlin bindings (ai.spa.mobile.ffi, generated and
// committed under src/main/kotlin), the idiomatic wrapper (ai.spa.mobile) and the Rust core
// libspa_ffi.so for arm64-v8a and x86_64 (put into build/rustJniLibs by cargo-ndk; see
// scripts/build-android.sh). Output: build/outputs/aar/spa-mobile-release.aar, publishable with
// `maven-publish` (`publishToMavenLocal`, or `publish` to -PspaMavenUrl).
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
    `maven-publish`
}

fun prop(name: String): String? = (findProperty(name) as String?)?.takeIf { it.isNotBlank() }

// ABIs built by cargo-ndk (scripts/build-android.sh --abi passes -PspaAbis).
val rustAbis = (prop("spaAbis") ?: "arm64-v8a,x86_64").split(",").map { it.trim() }

group = prop("spaGroup") ?: "ai.spa"
version = prop("spaVersion") ?: "0.1.0"

android {
    namespace = "ai.spa.mobile"
    compileSdk = 35

    defaultConfig {
        // Same API level as the Rust build (cargo ndk --platform 24).
        minSdk = 24
        consumerProguardFiles("consumer-rules.pro")
        ndk {
            abiFilters += rustAbis
        }
    }

    sourceSets {
        getByName("main") {
            java.srcDir("src/main/kotlin")
            // cargo ndk -o build/rustJniLibs writes <abi>/libspa_ffi.so here.
            jniLibs.srcDir(layout.buildDirectory.dir("rustJniLibs"))
        }
    }

    buildTypes {
        release {
            // A library is not minified itself; consumer-rules.pro protects JNA + bindings in apps.
            isMinifyEnabled = false
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }

    packaging {
        jniLibs {
            // cargo-ndk already strips the libraries; keep them as they are.
            keepDebugSymbols += "**/libspa_ffi.so"
        }
    }

    publishing {
        singleVariant("release") {
            withSourcesJar()
        }
    }
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    // The generated bindings load libspa_ffi.so through JNA (the AAR flavour has the Android
    // native dispatch libraries).
    implementation("net.java.dev.jna:jna:5.13.0@aar")
    // The wrapper's public API uses Flow and suspend functions.
    api("org.jetbrains.kotlinx:kotlinx-coroutines-core:1.8.1")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.8.1")
}

// Fail with a clear message instead of shipping an AAR without the native library.
val checkRustLibs by tasks.registering {
    val dir = layout.buildDirectory.dir("rustJniLibs")
    doLast {
        val missing = rustAbis.filter {
            !dir.get().file("$it/libspa_ffi.so").asFile.exists()
        }
        if (missing.isNotEmpty()) {
            throw GradleException(
                "libspa_ffi.so missing for ${missing.joinToString()} in ${dir.get().asFile}: " +
                    "run scripts/build-android.sh (cargo ndk) first",
            )
        }
    }
}
tasks.named("preBuild") { dependsOn(checkRustLibs) }

afterEvaluate {
    publishing {
        publications {
            create<MavenPublication>("release") {
                from(components["release"])
                groupId = project.group.toString()
                artifactId = prop("spaArtifact") ?: "spa-mobile"
                version = project.version.toString()
                pom {
                    name.set("spa-mobile")
                    description.set(
                        "Side Plugin Adaptation SDK: personal side network on the device, " +
                            "frozen base LM on an HTTPS server (Kotlin bindings + Rust core).",
                    )
                    licenses {
                        license {
                            name.set("Apache-2.0")
                            url.set("https://www.apache.org/licenses/LICENSE-2.0")
                        }
                    }
                }
            }
        }
        repositories {
            maven {
                name = "spa"
                url = uri(prop("spaMavenUrl") ?: layout.buildDirectory.dir("maven-repo").get().asFile.toURI())
                val user = prop("spaMavenUser")
                if (user != null) {
                    credentials {
                        username = user
                        password = prop("spaMavenPassword")
                    }
                }
            }
        }
    }
}

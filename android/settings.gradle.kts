// Gradle settings of the spa-mobile Android library (a single library module, this directory).
// Built by scripts/build-android.sh after cargo-ndk has put the Rust libraries into
// build/rustJniLibs; see docs/packaging.md.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
    plugins {
        id("com.android.library") version "8.7.3"
        id("org.jetbrains.kotlin.android") version "2.1.0"
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "spa-mobile"

// Gradle build of the Android sample apps (open this directory in Android Studio). The SDK is the
// library module in ../android (built with its Rust core by scripts/build-android.sh first).
// The view models (ChatViewModel.kt, KeyboardViewModel.kt) are plain Kotlin and are also compiled
// and tested on a JVM by scripts/test-ffi.sh; the UI files here need the Android SDK.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
    plugins {
        id("com.android.application") version "8.7.3"
        id("com.android.library") version "8.7.3"
        id("org.jetbrains.kotlin.android") version "2.1.0"
        id("org.jetbrains.kotlin.plugin.compose") version "2.1.0"
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "spa-mobile-samples"

include(":spa-mobile")
project(":spa-mobile").projectDir = file("../android")
include(":chat-android")
include(":keyboard-android")
project(":keyboard-android").projectDir = file("keyboard-demo/android")

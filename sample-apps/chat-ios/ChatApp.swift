// The chat sample's app entry point (Xcode: an iOS App target with ChatApp.swift, ChatView.swift
// and ChatViewModel.swift, depending on the SpaMobile package in ../../ios).
#if canImport(SwiftUI)
import SwiftUI
import SpaMobile

@main
struct ChatApp: App {
    var body: some Scene {
        WindowGroup {
            ChatView(defaults: ChatSettings(
                serverUrl: "https://localhost:8443", // replace with your server
                apiKey: "",
                // Only the tokenizer and LM head rows of the base GGUF are read on the device.
                modelPath: Bundle.main.path(forResource: "SmolLM2-135M-Instruct.Q4_1", ofType: "gguf") ?? ""
            ))
        }
    }
}
#endif

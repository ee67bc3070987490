// The chat sample's SwiftUI layer (needs Xcode / iOS 15+): messages with streaming text and a
// "how it was made" line, a stop button while an answer streams, and a settings sheet. All logic
// is in ChatViewModel.swift (tested on Linux); `ChatStore` republishes its state to SwiftUI.
#if canImport(SwiftUI)
import SwiftUI
import SpaMobile

@MainActor
final class ChatStore: ObservableObject {
    @Published private(set) var state = ChatUiState()
    let vm = ChatViewModel()
    init() { vm.onChange = { [weak self] in self?.state = $0 } }
}

struct ChatView: View {
    @StateObject private var store = ChatStore()
    @State private var settings: ChatSettings
    @State private var showSettings: Bool
    @State private var input = ""

    init(defaults: ChatSettings) {
        _settings = State(initialValue: defaults)
        _showSettings = State(initialValue: defaults.apiKey.isEmpty)
    }

    var body: some View {
        NavigationView {
            VStack(spacing: 8) {
                if let banner = store.state.banner {
                    Text(banner).foregroundColor(.red).font(.footnote)
                }
                ScrollViewReader { proxy in
                    List(store.state.messages) { m in
                        VStack(alignment: m.fromUser ? .trailing : .leading, spacing: 4) {
                            Text(m.streaming && m.text.isEmpty ? "…" : m.text)
                            if let e = m.error { Text(e).font(.caption).foregroundColor(.red) }
                            // How it was made: rounds per token, side usage, network vs on-device time.
                            if let info = m.info { Text(info).font(.caption2).foregroundColor(.secondary) }
                        }
                        .frame(maxWidth: .infinity, alignment: m.fromUser ? .trailing : .leading)
                        .id(m.id)
                    }
                    .onChange(of: store.state.messages.last?.text) { _ in
                        if let last = store.state.messages.last { proxy.scrollTo(last.id, anchor: .bottom) }
                    }
                }
                HStack {
                    TextField("Message", text: $input).textFieldStyle(.roundedBorder).disabled(!store.state.connected)
                    if store.state.generating {
                        Button("Stop") { store.vm.stop() }
                    } else {
                        Button("Send") { if store.vm.send(input) != nil { input = "" } }
                            .disabled(!store.state.connected || input.isEmpty)
                    }
                }
                .padding(.horizontal)
            }
            .navigationTitle(store.state.connecting ? "Connecting…" : store.state.personalized ? "Chat · personal" : "Chat")
            .toolbar {
                ToolbarItem(placement: .navigationBarLeading) { Button("New") { store.vm.newChat() } }
                ToolbarItem(placement: .navigationBarTrailing) { Button("Settings") { showSettings = true } }
            }
            .sheet(isPresented: $showSettings) {
                SettingsView(settings: $settings) {
                    showSettings = false
                    store.vm.connect(settings)
                }
            }
            .task { if !settings.apiKey.isEmpty { store.vm.connect(settings) } }
        }
    }
}

struct SettingsView: View {
    @Binding var settings: ChatSettings
    let onConnect: () -> Void

    var body: some View {
        Form {
            Section("Server") {
                TextField("https://…", text: $settings.serverUrl).textInputAutocapitalization(.never)
                SecureField("API key", text: $settings.apiKey)
            }
            Section("Sampling") {
                Stepper("Draft length K = \(settings.draftK)", value: $settings.draftK, in: 1...16)
                VStack(alignment: .leading) {
                    Text(String(format: "Temperature %.2f (0 = greedy)", settings.temperature))
                    Slider(value: $settings.temperature, in: 0...1.5)
                }
                VStack(alignment: .leading) {
                    Text(String(format: "Top-p %.2f (0 = off)", settings.topP))
                    Slider(value: $settings.topP, in: 0...1)
                }
            }
            Button("Connect", action: onConnect)
        }
    }
}
#endif

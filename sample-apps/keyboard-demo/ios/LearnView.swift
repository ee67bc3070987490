// "Learn from my writing" (the containing app of the keyboard extension; SwiftUI, needs Xcode):
// trains the personal side network on this device with progress and cancel, saves the weights in
// the App Group container (never uploaded), and shows quality before/after on held-out text.
// Logic: KeyboardViewModel.swift (tested on Linux).
#if canImport(SwiftUI)
import SwiftUI
import SpaMobile

@MainActor
final class KeyboardStore: ObservableObject {
    @Published private(set) var state = KeyboardUiState()
    let vm = KeyboardViewModel(config: KeyboardSetup.config, storageDir: KeyboardSetup.storageDir)
    init() {
        vm.onChange = { [weak self] in self?.state = $0 }
        vm.start()
    }
}

struct LearnView: View {
    @StateObject private var store = KeyboardStore()
    @State private var text = ""

    var body: some View {
        Form {
            Section(footer: Text("Learns on this phone. Your text and the personal model stay here; the server computes the shared base model's features of the token ids, as for every suggestion.")) {
                TextEditor(text: $text).frame(minHeight: 160)
            }
            switch store.state.learning {
            case .running(let step, let maxSteps, let loss):
                ProgressView(value: Double(step), total: Double(max(maxSteps, 1)))
                Text("Step \(step) of at most \(maxSteps)" + (loss.map { String(format: " · loss %.3f", $0) } ?? ""))
                Button("Cancel", role: .cancel) { store.vm.cancelLearning() }
            default:
                Button("Learn from my writing") {
                    // The last fifth is held out: quality is measured on words never trained on.
                    let cut = text.index(text.startIndex, offsetBy: text.count * 4 / 5)
                    let (train, held) = (String(text[..<cut]), String(text[cut...]))
                    Task {
                        await store.vm.learn([train], heldOut: [held]).value
                        store.vm.compare(held, words: 20)
                    }
                }
                .disabled(!store.state.ready || text.count < 2_000)
                if store.state.personalized { Button("Forget", role: .destructive) { store.vm.forget() } }
            }
            switch store.state.learning {
            case .done(let r): Text("Kept: \(r.shipped) · " + KeyboardViewModel.summary(r.before, r.shippedQuality))
            case .failed(let m): Text(m).foregroundColor(.red)
            case .cancelled: Text("Cancelled; nothing was saved.")
            default: EmptyView()
            }
            if !store.state.comparison.isEmpty {
                Section("Before each word of your held-out text") {
                    ForEach(Array(store.state.comparison.enumerated()), id: \.offset) { _, r in
                        Text("\(r.word): base \(r.base.joined(separator: " | ")) → personal \(r.personal.joined(separator: " | "))")
                            .font(.caption)
                    }
                }
            }
        }
    }
}
#endif

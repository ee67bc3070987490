// The chat sample's logic: plain Swift over the SDK's API (SpaMobile) and Foundation only, so it
// compiles and is tested on Linux (sample-apps/swift-test, run by scripts/test-ffi.sh in the Swift
// chroot). The SwiftUI layer (ChatView.swift) observes it through `ChatStore`.
import Foundation
#if canImport(SpaMobile)
import SpaMobile
import SpaMobileFFI
#endif

/// What the settings screen edits.
public struct ChatSettings: Equatable {
    public var serverUrl: String
    public var apiKey: String
    /// Extra trusted root (PEM), e.g. a development server's self-signed certificate.
    public var caCertPem: String?
    /// The base model's GGUF on the device (tokenizer + LM head rows only).
    public var modelPath: String
    /// Personal side weights from the keyboard demo, if any.
    public var personalWeightsPath: String?
    /// 0: greedy.
    public var temperature: Float = 0
    public var topP: Float = 0
    /// Draft length K: base tokens proposed per round.
    public var draftK: Int = 8
    public var maxTokens: Int = 256

    public init(serverUrl: String, apiKey: String, caCertPem: String? = nil, modelPath: String,
                personalWeightsPath: String? = nil) {
        self.serverUrl = serverUrl
        self.apiKey = apiKey
        self.caCertPem = caCertPem
        self.modelPath = modelPath
        self.personalWeightsPath = personalWeightsPath
    }

    public func config() -> SpaConfig {
        SpaConfig(serverUrl: serverUrl, apiKey: apiKey, caCertPem: caCertPem, modelPath: modelPath,
                  personalWeightsPath: personalWeightsPath, quantization: .q8, threads: 0,
                  timeoutMs: 20_000, maxAttempts: 3)
    }

    public func params() -> GenerateParams {
        GenerateParams(maxTokens: UInt32(min(max(maxTokens, 1), 4096)), draftK: UInt32(min(max(draftK, 1), 64)),
                       temperature: temperature, topP: topP, seed: 0)
    }
}

/// One bubble. `info` is the "how it was made" line of a finished answer.
public struct UiMessage: Identifiable, Equatable {
    public let id: Int
    public let fromUser: Bool
    public var text: String
    public var streaming = false
    public var info: String?
    /// Set when the answer failed or was stopped; `text` keeps what had arrived.
    public var error: String?
}

public struct ChatUiState: Equatable {
    public var connected = false
    public var connecting = false
    public var personalized = false
    public var messages: [UiMessage] = []
    public var generating = false
    /// A problem to show above the input; nil when all is well.
    public var banner: String?
}

/// The chat screen's state machine, on the main actor. `onChange` sees every new state (the
/// SwiftUI layer republishes it).
@MainActor
public final class ChatViewModel {
    public private(set) var state = ChatUiState() {
        didSet { onChange?(state) }
    }
    public var onChange: ((ChatUiState) -> Void)?

    private let connector: @Sendable (SpaConfig) async throws -> SpaMobile
    private var settings: ChatSettings?
    private var spa: SpaMobile?
    private var chat: Chat?
    private var task: Task<Void, Never>?
    private var nextId = 0

    public init(connector: @escaping @Sendable (SpaConfig) async throws -> SpaMobile = { try await SpaMobile.connect($0) }) {
        self.connector = connector
    }

    /// Connects (again) with `s`; the conversation starts over.
    @discardableResult
    public func connect(_ s: ChatSettings) -> Task<Void, Never> {
        task?.cancel()
        let previous = task
        return Task {
            await previous?.value
            chat = nil
            spa = nil
            settings = s
            state.connecting = true
            state.connected = false
            state.banner = nil
            state.messages = []
            do {
                let c = try await connector(s.config())
                spa = c
                chat = c.chat()
                state.connecting = false
                state.connected = true
                state.personalized = c.isPersonalized
            } catch {
                state.connecting = false
                state.banner = Self.describe(error)
            }
        }
    }

    /// Sends `prompt`; the answer streams into a new bubble. nil while an answer is streaming.
    @discardableResult
    public func send(_ prompt: String) -> Task<Void, Never>? {
        guard !prompt.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, !state.generating else { return nil }
        guard let c = chat, let s = settings else {
            state.banner = "Not connected. Check the server in Settings."
            return nil
        }
        let answerId = nextId + 1
        state.messages.append(UiMessage(id: nextId, fromUser: true, text: prompt))
        state.messages.append(UiMessage(id: answerId, fromUser: false, text: "", streaming: true))
        nextId += 2
        state.generating = true
        state.banner = nil
        let t = Task {
            do {
                for try await piece in c.stream(prompt, params: s.params()) {
                    edit(answerId) { $0.text += piece }
                }
                if Task.isCancelled {
                    edit(answerId) { $0.streaming = false; $0.error = "Stopped" }
                } else {
                    let info = c.lastStats.map(Self.howItWasMade)
                    edit(answerId) { $0.streaming = false; $0.info = info }
                }
            } catch {
                let stopped = Task.isCancelled || (error as? SpaMobileError) == .Cancelled
                edit(answerId) { $0.streaming = false; $0.error = stopped ? "Stopped" : Self.describe(error) }
                if !stopped, let e = error as? SpaMobileError, Self.isConnectionProblem(e) {
                    state.banner = Self.describe(e)
                }
            }
            state.generating = false
        }
        task = t
        return t
    }

    /// The stop button: ends the streaming answer (kept as far as it got, marked "Stopped").
    public func stop() { task?.cancel() }

    /// Starts a new conversation on the same connection.
    public func newChat() {
        stop()
        chat = spa?.chat()
        state.messages = []
        state.generating = false
    }

    private func edit(_ id: Int, _ f: (inout UiMessage) -> Void) {
        if let i = state.messages.firstIndex(where: { $0.id == id }) { f(&state.messages[i]) }
    }

    /// The per-message line: rounds per token, side usage, network vs on-device time.
    public nonisolated static func howItWasMade(_ st: GenerationStats) -> String {
        String(format: "%d tokens · %.2f rounds/token · side %.0f%% · network %.0f ms · on-device %.0f ms",
               Int(st.tokens), st.roundsPerToken, 100 * st.sideUsage, st.tNetMs, st.tOnDeviceMs)
    }

    nonisolated static func isConnectionProblem(_ e: SpaMobileError) -> Bool {
        switch e {
        case .Unauthorized, .Network: return true
        default: return false
        }
    }

    /// A message for people, never the raw error.
    public nonisolated static func describe(_ error: Error) -> String {
        guard let e = error as? SpaMobileError else { return "Something went wrong." }
        switch e {
        case .Unauthorized: return "The server refused the API key. Check it in Settings."
        case .Network: return "Can't reach the server. Check the connection and the server URL."
        case .Server: return "The server had a problem. Try again in a moment."
        case .Incompatible: return "This app's model files don't match the server's model."
        case .InvalidConfig(let reason): return "The settings are not valid: \(reason)"
        case .Model: return "The on-device model could not be loaded."
        case .Storage: return "Could not read or write the app's files."
        case .Cancelled: return "Stopped"
        default: return "Something went wrong."
        }
    }
}

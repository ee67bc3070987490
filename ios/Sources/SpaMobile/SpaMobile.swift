// Idiomatic Swift API of spa-mobile over the UniFFI bindings (module SpaMobileFFI, generated from
// rust/spa-ffi by scripts/test-ffi.sh). Reference: docs/swift.md; design: docs/mobile.md.
import Foundation
#if canImport(SpaMobileFFI)
// Re-exported: `import SpaMobile` alone gives apps the generated records, enums and errors
// (SpaConfig, GenerateParams, SpaMobileError, ...) that the wrapper's API uses.
@_exported import SpaMobileFFI
#endif

/// A connection to an SPA base server plus the on-device half of the model.
///
/// ```swift
/// import SpaMobile
///
/// let spa = try await SpaMobile.connect(config)
/// let chat = spa.chat()
/// for try await piece in chat.stream("Hello!") { print(piece, terminator: "") }
/// ```
/// Every failure is a `SpaMobileError` (`.Unauthorized`, `.Network(reason:)`, ...).
///
/// The module and this class share the name `SpaMobile`: in an app, `SpaMobile` is the class, so
/// `SpaMobile.X` looks inside the class. `SpaMobile.Chat` and `SpaMobile.Personalization` are
/// nested aliases for that reason; the generated types can be qualified as `SpaMobileFFI.X`.
public final class SpaMobile: @unchecked Sendable {
    /// The bindings' client.
    public let client: SpaClient

    init(client: SpaClient) { self.client = client }

    /// Connects to the server and loads the device model.
    public static func connect(_ config: SpaConfig) async throws -> SpaMobile {
        SpaMobile(client: try await ffiConnect(config))
    }

    /// `connect(_:)`, reporting the device pack's download (when `config.modelPath` is nil and
    /// the pack is kept in `config.devicePackDir`): `onDownload` gets the bytes on the device and
    /// the pack's size, on a library thread (once with `done == total` when the pack is already
    /// there). If it throws, connect fails with `SpaMobileError.Callback`; the bytes already
    /// downloaded are kept and the next connect resumes from them.
    public static func connect(_ config: SpaConfig,
                               onDownload: @escaping @Sendable (_ done: UInt64, _ total: UInt64) throws -> Void) async throws -> SpaMobile {
        SpaMobile(client: try await connectWithProgress(config: config, listener: DownloadListener(onDownload)))
    }

    /// What the server serves.
    public var manifest: ModelManifest { client.manifest() }

    /// A new conversation (multi-turn chat).
    public func chat() -> Chat { Chat(conversation: client.conversation()) }

    /// Whether this connection runs personal weights.
    public var isPersonalized: Bool { client.isPersonalized() }

    /// Whether the suggestion strip uses the user's word cache (`personalWordsPath` was loaded).
    public var usesPersonalWords: Bool { client.usesPersonalWords() }

    /// Up to `count` next-word suggestions for `textBeforeCursor` (a keyboard's suggestion
    /// strip; a partly typed word is completed). One request to the server.
    public func suggest(_ textBeforeCursor: String, count: Int = 3) async throws -> Suggestions {
        try await client.suggest(text: textBeforeCursor, count: UInt32(clamping: count))
    }

    /// Personalization with its weights in `storageDir` (an app-private directory).
    public func personalization(storageDir: String) -> Personalization {
        Personalization(personalizer: client.personalizer(storageDir: storageDir))
    }
}

private func ffiConnect(_ config: SpaConfig) async throws -> SpaClient {
    try await connect(config: config)
}

private final class DownloadListener: ConnectListener, @unchecked Sendable {
    let f: @Sendable (UInt64, UInt64) throws -> Void
    init(_ f: @escaping @Sendable (UInt64, UInt64) throws -> Void) { self.f = f }
    func onDownload(done: UInt64, total: UInt64) throws { try f(done, total) }
}

/// One conversation. Generations run one at a time.
public final class Chat: @unchecked Sendable {
    /// The bindings' conversation, for the handle API (`start` -> `Generation`).
    public let conversation: Conversation
    private let lock = NSLock()
    private var stats: GenerationStats?

    init(conversation: Conversation) { self.conversation = conversation }

    /// Statistics of the last generation that completed.
    public var lastStats: GenerationStats? {
        lock.lock(); defer { lock.unlock() }
        return stats
    }

    fileprivate func setStats(_ s: GenerationStats) {
        lock.lock(); stats = s; lock.unlock()
    }

    /// Streams the answer to `prompt` as text pieces. Ending the iteration early (break, task
    /// cancellation) cancels the generation; errors are thrown as `SpaMobileError`.
    public func stream(_ prompt: String, params: GenerateParams = GenerateParams()) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            let listener = StreamListener(continuation: continuation, chat: self)
            let generation = conversation.start(prompt: prompt, params: params, listener: listener)
            continuation.onTermination = { _ in generation.cancel() }
        }
    }

    /// Generates the whole answer; `onToken` sees the text as it streams. `onToken` runs on a
    /// library thread while the caller waits (hence `@Sendable`: keep state it changes in a
    /// `Sendable` box, or use `stream` and change it in the loop). Cancelling the task cancels
    /// the generation (`SpaMobileError.Cancelled`); if `onToken` throws, it ends with
    /// `SpaMobileError.Callback`.
    public func send(_ prompt: String, params: GenerateParams = GenerateParams(),
                     onToken: @escaping @Sendable (String) throws -> Void = { _ in }) async throws -> Reply {
        let generation = conversation.start(prompt: prompt, params: params, listener: ClosureListener(onToken))
        let reply = try await withTaskCancellationHandler {
            try await generation.finish()
        } onCancel: {
            generation.cancel()
        }
        setStats(reply.stats)
        return reply
    }

    /// The messages so far (failed or cancelled turns are left out).
    public var history: [ChatMessage] { conversation.history() }

    /// Forgets the conversation.
    public func reset() async { await conversation.reset() }
}

private final class StreamListener: GenerationListener, @unchecked Sendable {
    let continuation: AsyncThrowingStream<String, Error>.Continuation
    let chat: Chat
    init(continuation: AsyncThrowingStream<String, Error>.Continuation, chat: Chat) {
        self.continuation = continuation
        self.chat = chat
    }
    func onToken(text: String) throws { continuation.yield(text) }
    func onDone(stats: GenerationStats) throws {
        chat.setStats(stats)
        continuation.finish()
    }
    func onError(error: SpaMobileError) throws { continuation.finish(throwing: error) }
}

private final class ClosureListener: GenerationListener, @unchecked Sendable {
    let f: @Sendable (String) throws -> Void
    init(_ f: @escaping @Sendable (String) throws -> Void) { self.f = f }
    func onToken(text: String) throws { try f(text) }
    func onDone(stats: GenerationStats) throws {}
    func onError(error: SpaMobileError) throws {}
}

/// Trains personal weights on the user's texts (on the device; the server only computes base
/// features of the token ids), learns the user's word cache, and keeps in app storage whichever
/// of base, word cache, side network and both saves the most keystrokes on the end of the user's
/// own text (`PersonalizationReport.shipped`). Connect again with
/// `personalWeightsPath: weightsPath` and `personalWordsPath: wordsPath` to use them (a missing
/// file is simply not used).
public final class Personalization: @unchecked Sendable {
    /// The bindings' personalizer.
    public let personalizer: Personalizer

    init(personalizer: Personalizer) { self.personalizer = personalizer }

    /// Trains, reports next-word quality of every candidate on `heldOut`, and saves what ships
    /// atomically. Cancelling the task (or `cancel()`) stops it with `SpaMobileError.Cancelled`
    /// and saves nothing. `onProgress` runs on a library thread after each training step; if it
    /// throws, training stops with `SpaMobileError.Callback`.
    public func train(_ texts: [String], heldOut: [String], options: PersonalizeOptions = PersonalizeOptions(),
                      onProgress: @escaping @Sendable (TrainProgress) throws -> Void = { _ in }) async throws -> PersonalizationReport {
        let p = personalizer
        return try await withTaskCancellationHandler {
            try await p.train(texts: texts, heldOut: heldOut, options: options, listener: ProgressListener(onProgress))
        } onCancel: {
            p.cancel()
        }
    }

    /// Stops a running `train`.
    public func cancel() { personalizer.cancel() }

    /// Where the weights are saved.
    public var weightsPath: String { personalizer.weightsPath() }

    /// Whether weights are saved.
    public var hasSavedWeights: Bool { personalizer.hasSavedWeights() }

    /// Where the word cache is saved.
    public var wordsPath: String { personalizer.wordsPath() }

    /// Whether a word cache is saved.
    public var hasSavedWords: Bool { personalizer.hasSavedWords() }

    /// Deletes the saved weights and word cache.
    public func delete() throws { try personalizer.deleteWeights() }
}

// `SpaMobile.Chat` / `SpaMobile.Personalization`: in an app, `SpaMobile` names the class, not
// the module, so these nested aliases are what a module-qualified spelling resolves to (needed
// when the app declares its own `Chat`). The underscored aliases exist only to reach the
// top-level types from inside the class's scope.
public typealias _SpaMobileChat = Chat
public typealias _SpaMobilePersonalization = Personalization

extension SpaMobile {
    /// The wrapper's `Chat` (for apps that have a `Chat` type of their own).
    public typealias Chat = _SpaMobileChat
    /// The wrapper's `Personalization` (for apps that have a type of that name).
    public typealias Personalization = _SpaMobilePersonalization
}

private final class ProgressListener: PersonalizeListener, @unchecked Sendable {
    let f: @Sendable (TrainProgress) throws -> Void
    init(_ f: @escaping @Sendable (TrainProgress) throws -> Void) { self.f = f }
    func onProgress(progress: TrainProgress) throws { try f(progress) }
}

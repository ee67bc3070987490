// The keyboard demo's logic: plain Swift over the SDK's API (SpaMobile) and Foundation, tested on
// Linux (sample-apps/swift-test). The keyboard extension (KeyboardViewController.swift) and the
// "learn from my writing" screen (LearnView.swift) drive one instance.
import Foundation
#if canImport(SpaMobile)
import SpaMobile
import SpaMobileFFI
#endif

/// The "learn from my writing" run.
public enum Learning: Equatable {
    case idle
    case running(step: Int, maxSteps: Int, loss: Double?)
    case done(PersonalizationReport)
    case failed(String)
    case cancelled
}

/// One word of the user's held-out text: what each strip showed before its first letter.
public struct WordComparison: Equatable {
    public let word: String
    public let base: [String]
    public let personal: [String]
    public var baseHit: Bool { base.contains(word) }
    public var personalHit: Bool { personal.contains(word) }
}

public struct KeyboardUiState: Equatable {
    public var ready = false
    /// Text before the cursor.
    public var text = ""
    /// The strip: up to 3 words, best first.
    public var suggestions: [String] = []
    /// The strip came from the personal side path.
    public var suggestionsPersonal = false
    /// Personal weights are saved and in use.
    public var personalized = false
    public var learning: Learning = .idle
    /// Before/after on the user's held-out text (after `compare`).
    public var comparison: [WordComparison] = []
    public var banner: String?
}

/// Suggestion strip + on-device personalization. Personal weights live in `storageDir` (the app
/// group's private container) and are never uploaded: training runs here, and the server only
/// computes the frozen base's features of token ids, as it does for every suggestion.
@MainActor
public final class KeyboardViewModel {
    public private(set) var state = KeyboardUiState() {
        didSet { onChange?(state) }
    }
    public var onChange: ((KeyboardUiState) -> Void)?

    private let config: SpaConfig
    private let storageDir: String
    private let suggestDelay: UInt64
    private let connector: @Sendable (SpaConfig) async throws -> SpaMobile
    /// The base alone (the "before" strip; also runs the personalization).
    private var base: SpaMobile?
    /// With the saved personal weights, once there are some.
    private var personal: SpaMobile?
    private var suggestTask: Task<Void, Never>?
    private var learnTask: Task<Void, Never>?

    /// `suggestDelayMs` debounces typing (a request per pause, not per key).
    public init(config: SpaConfig, storageDir: String, suggestDelayMs: Int = 60,
                connector: @escaping @Sendable (SpaConfig) async throws -> SpaMobile = { try await SpaMobile.connect($0) }) {
        self.config = config
        self.storageDir = storageDir
        self.suggestDelay = UInt64(max(suggestDelayMs, 0)) * 1_000_000
        self.connector = connector
    }

    private func withWeights(_ path: String?) -> SpaConfig {
        var c = config
        c.personalWeightsPath = path
        return c
    }

    /// A client with what the last personalization kept (weights, word cache), or nil.
    private func connectPersonal(_ p: Personalization) async throws -> SpaMobile? {
        guard p.hasSavedWeights || p.hasSavedWords else { return nil }
        var c = config
        c.personalWeightsPath = p.weightsPath
        c.personalWordsPath = p.wordsPath
        return try await connector(c)
    }

    /// Connects; loads the saved personal weights and word cache when there are some.
    @discardableResult
    public func start() -> Task<Void, Never> {
        Task {
            do {
                let b = try await connector(withWeights(nil))
                base = b
                personal = try await connectPersonal(b.personalization(storageDir: storageDir))
                state.ready = true
                state.personalized = personal != nil
                state.banner = nil
                await refresh(state.text, delay: 0).value
            } catch {
                state.ready = false
                state.banner = Self.describe(error)
            }
        }
    }

    /// The text before the cursor changed (typing, deleting, moving the cursor).
    @discardableResult
    public func textChanged(_ textBeforeCursor: String) -> Task<Void, Never> {
        state.text = textBeforeCursor
        return refresh(textBeforeCursor, delay: suggestDelay)
    }

    /// The user tapped `word`: returns the text that replaces the partly typed word (the word and
    /// a space; the extension inserts it) and updates the strip for the new position.
    @discardableResult
    public func pick(_ word: String) -> String {
        let t = state.text
        let partial = String(t.reversed().prefix(while: { $0.isLetter || $0 == "'" }).reversed())
        let inserted = String(word.dropFirst(word.hasPrefix(partial) ? partial.count : 0)) + " "
        textChanged(t + inserted)
        return inserted
    }

    private func refresh(_ text: String, delay: UInt64) -> Task<Void, Never> {
        suggestTask?.cancel()
        let t = Task {
            if delay > 0 { try? await Task.sleep(nanoseconds: delay) }
            guard !Task.isCancelled, let c = personal ?? base else { return }
            do {
                let s = try await c.suggest(text, count: 3)
                // A newer keystroke has its own request; only the latest text's answer is shown.
                if state.text == text {
                    state.suggestions = s.words
                    state.suggestionsPersonal = s.personal
                    state.banner = nil
                }
            } catch {
                if !Task.isCancelled {
                    state.suggestions = []
                    state.banner = Self.describe(error)
                }
            }
        }
        suggestTask = t
        return t
    }

    /// "Learn from my writing": trains personal weights and learns the word cache on `texts` (on
    /// this device), keeps whichever of base, cache, side network or both saves the most keys on
    /// the end of `texts`, reports next-word quality on `heldOut`, and switches the strip to what
    /// was kept.
    @discardableResult
    public func learn(_ texts: [String], heldOut: [String], options: PersonalizeOptions = PersonalizeOptions()) -> Task<Void, Never> {
        learnTask?.cancel()
        let t = Task {
            guard let b = base else {
                state.learning = .failed("Not connected.")
                return
            }
            state.learning = .running(step: 0, maxSteps: Int(options.steps), loss: nil)
            do {
                let learner = b.personalization(storageDir: storageDir)
                let report = try await learner.train(texts, heldOut: heldOut, options: options) { p in
                    Task { @MainActor [weak self] in
                        if case .running = self?.state.learning {
                            self?.state.learning = .running(step: Int(p.step), maxSteps: Int(p.maxSteps), loss: p.loss)
                        }
                    }
                }
                // Storage now holds what shipped (nothing when the base did best).
                let next = try await connectPersonal(learner)
                personal = next
                state.learning = .done(report)
                state.personalized = next != nil
                await refresh(state.text, delay: 0).value
            } catch {
                if Task.isCancelled || (error as? SpaMobileError) == .Cancelled {
                    state.learning = .cancelled
                } else {
                    state.learning = .failed(Self.describe(error))
                }
            }
        }
        learnTask = t
        return t
    }

    /// Stops a running `learn`; nothing is saved and the previous weights stay in use.
    public func cancelLearning() { learnTask?.cancel() }

    /// Deletes the personal weights; the strip goes back to the base.
    @discardableResult
    public func forget() -> Task<Void, Never> {
        Task {
            personal = nil
            try? base?.personalization(storageDir: storageDir).delete()
            state.personalized = false
            state.learning = .idle
            state.comparison = []
            await refresh(state.text, delay: 0).value
        }
    }

    /// Before/after view: before each of the first `words` words of `heldOut`, the base strip
    /// and the personal strip (empty without personal weights).
    @discardableResult
    public func compare(_ heldOut: String, words: Int = 12) -> Task<Void, Never> {
        Task {
            guard let b = base else { return }
            var rows: [WordComparison] = []
            var i = heldOut.startIndex
            do {
                while i < heldOut.endIndex, rows.count < words {
                    let c = heldOut[i]
                    let isWord = c.isLetter || c == "'"
                    if isWord, i > heldOut.startIndex, heldOut[heldOut.index(before: i)] == " " {
                        var j = i
                        while j < heldOut.endIndex, heldOut[j].isLetter || heldOut[j] == "'" { j = heldOut.index(after: j) }
                        let before = String(heldOut[..<i])
                        let word = String(heldOut[i..<j])
                        let bs = try await b.suggest(before, count: 3).words
                        let ps = try await personal?.suggest(before, count: 3).words ?? []
                        rows.append(WordComparison(word: word, base: bs, personal: ps))
                        i = j
                    } else {
                        i = heldOut.index(after: i)
                    }
                }
                state.comparison = rows
            } catch {
                state.banner = Self.describe(error)
            }
        }
    }

    public nonisolated static func describe(_ error: Error) -> String {
        guard let e = error as? SpaMobileError else { return "Suggestions are unavailable right now." }
        switch e {
        case .Unauthorized: return "The server refused the API key."
        case .Network: return "No connection to the suggestion server."
        case .Storage: return "Could not save the personal model."
        case .InvalidConfig(let reason): return "Not enough text to learn from, or bad settings: \(reason)"
        default: return "Suggestions are unavailable right now."
        }
    }

    /// "top-3 31.6% → 35.2% · keys saved 46.9% → 49.0%"
    public nonisolated static func summary(_ before: NextWordQuality, _ after: NextWordQuality) -> String {
        String(format: "top-3 %.1f%% → %.1f%% · keys saved %.1f%% → %.1f%%",
               before.top3, after.top3, before.keystrokeSavings, after.keystrokeSavings)
    }
}

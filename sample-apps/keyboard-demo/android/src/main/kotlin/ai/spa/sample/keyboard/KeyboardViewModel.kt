// The keyboard demo's logic: plain Kotlin over the SDK's API (ai.spa.mobile) and
// kotlinx.coroutines, tested on a JVM (sample-apps/jvm-test). The Android input method
// (SpaKeyboardService.kt) and the "learn from my writing" screen (LearnScreen.kt) both drive one
// instance.
package ai.spa.sample.keyboard

import ai.spa.mobile.Personalization
import ai.spa.mobile.SpaMobile
import ai.spa.mobile.ffi.NextWordQuality
import ai.spa.mobile.ffi.PersonalizationReport
import ai.spa.mobile.ffi.PersonalizeOptions
import ai.spa.mobile.ffi.SpaConfig
import ai.spa.mobile.ffi.SpaMobileException
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.Job
import kotlinx.coroutines.delay
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.launch
import kotlinx.coroutines.sync.Mutex
import kotlinx.coroutines.sync.withLock

/** The "learn from my writing" run. */
sealed interface Learning {
    data object Idle : Learning
    data class Running(val step: Int, val maxSteps: Int, val loss: Double?) : Learning
    data class Done(val report: PersonalizationReport) : Learning
    data class Failed(val message: String) : Learning
    data object Cancelled : Learning
}

/** One word of the user's held-out text: what each strip showed before its first letter. */
data class WordComparison(val word: String, val base: List<String>, val personal: List<String>) {
    val baseHit get() = word in base
    val personalHit get() = word in personal
}

data class KeyboardUiState(
    val ready: Boolean = false,
    /** Text before the cursor. */
    val text: String = "",
    /** The strip: up to 3 words, best first. */
    val suggestions: List<String> = emptyList(),
    /** The strip came from the personal side path. */
    val suggestionsPersonal: Boolean = false,
    /** Personal weights are saved and in use. */
    val personalized: Boolean = false,
    val learning: Learning = Learning.Idle,
    /** Before/after on the user's held-out text (after [KeyboardViewModel.compare]). */
    val comparison: List<WordComparison> = emptyList(),
    val banner: String? = null,
)

/**
 * Suggestion strip + on-device personalization. Personal weights live in [storageDir] (app-private
 * storage) and are never uploaded: training runs here, and the server only computes the frozen
 * base's features of token ids, as it does for every suggestion.
 *
 * [suggestDelayMs] debounces typing (a request per pause, not per key).
 */
class KeyboardViewModel(
    private val scope: CoroutineScope,
    private val config: SpaConfig,
    private val storageDir: String,
    private val suggestDelayMs: Long = 60,
    private val connector: suspend (SpaConfig) -> SpaMobile = { SpaMobile.connect(it) },
) : AutoCloseable {
    private val _state = MutableStateFlow(KeyboardUiState())
    val state: StateFlow<KeyboardUiState> = _state.asStateFlow()

    /** The base alone (the "before" strip; also runs the personalization). */
    private var base: SpaMobile? = null
    /** With the saved personal weights, once there are some. */
    private var personal: SpaMobile? = null
    private val clients = Mutex()
    private var suggestJob: Job? = null
    private var learnJob: Job? = null

    /** A client with what the last personalization kept (weights, word cache), or null. */
    private suspend fun connectPersonal(p: Personalization): SpaMobile? =
        if (p.hasSavedWeights || p.hasSavedWords) {
            connector(config.copy(personalWeightsPath = p.weightsPath, personalWordsPath = p.wordsPath))
        } else {
            null
        }

    /** Connects; loads the saved personal weights and word cache when there are some. */
    fun start(): Job = scope.launch {
        try {
            clients.withLock {
                val b = connector(config.copy(personalWeightsPath = null))
                base = b
                b.personalization(storageDir).use { p -> personal = connectPersonal(p) }
            }
            _state.update { it.copy(ready = true, personalized = personal != null, banner = null) }
            refresh(_state.value.text, 0)
        } catch (e: SpaMobileException) {
            _state.update { it.copy(ready = false, banner = describe(e)) }
        }
    }

    /** The text before the cursor changed (typing, deleting, moving the cursor). */
    fun onTextChanged(textBeforeCursor: String): Job {
        _state.update { it.copy(text = textBeforeCursor) }
        return refresh(textBeforeCursor, suggestDelayMs)
    }

    /**
     * The user tapped [word]: returns the text that replaces the partly typed word (the word and a
     * space; an input method commits it) and updates the strip for the new position.
     */
    fun pick(word: String): String {
        val t = _state.value.text
        val partial = t.takeLastWhile { it.isLetter() || it == '\'' }
        val inserted = word.removePrefix(partial) + " "
        onTextChanged(t + inserted)
        return inserted
    }

    private fun refresh(text: String, delayMs: Long): Job {
        suggestJob?.cancel()
        val j = scope.launch {
            if (delayMs > 0) delay(delayMs)
            val c = personal ?: base ?: return@launch
            try {
                val s = c.suggest(text, 3)
                // A newer keystroke has its own request; only the latest text's answer is shown.
                if (_state.value.text == text) {
                    _state.update { it.copy(suggestions = s.words, suggestionsPersonal = s.personal, banner = null) }
                }
            } catch (e: SpaMobileException) {
                _state.update { it.copy(suggestions = emptyList(), banner = describe(e)) }
            }
        }
        suggestJob = j
        return j
    }

    /**
     * "Learn from my writing": trains personal weights and learns the word cache on [texts] (on
     * this device), keeps whichever of base, cache, side network or both saves the most keys on
     * the end of [texts], reports next-word quality on [heldOut], and switches the strip to what
     * was kept. Progress is in [KeyboardUiState.learning].
     */
    fun learn(texts: List<String>, heldOut: List<String>, options: PersonalizeOptions = PersonalizeOptions()): Job {
        learnJob?.cancel()
        val j = scope.launch {
            val b = base ?: run {
                _state.update { it.copy(learning = Learning.Failed("Not connected.")) }
                return@launch
            }
            _state.update { it.copy(learning = Learning.Running(0, options.steps.toInt(), null)) }
            try {
                val (report, next) = b.personalization(storageDir).use { p ->
                    val r = p.train(texts, heldOut, options) { pr ->
                        _state.update { it.copy(learning = Learning.Running(pr.step.toInt(), pr.maxSteps.toInt(), pr.loss)) }
                    }
                    // Storage now holds what shipped (nothing when the base did best).
                    r to connectPersonal(p)
                }
                clients.withLock {
                    personal?.close()
                    personal = next
                }
                _state.update { it.copy(learning = Learning.Done(report), personalized = next != null) }
                refresh(_state.value.text, 0)
            } catch (e: CancellationException) {
                _state.update { it.copy(learning = Learning.Cancelled) }
                throw e
            } catch (e: SpaMobileException.Cancelled) {
                _state.update { it.copy(learning = Learning.Cancelled) }
            } catch (e: SpaMobileException) {
                _state.update { it.copy(learning = Learning.Failed(describe(e))) }
            }
        }
        learnJob = j
        return j
    }

    /** Stops a running [learn]; nothing is saved and the previous weights stay in use. */
    fun cancelLearning() {
        learnJob?.cancel()
    }

    /** Deletes the personal weights and word cache; the strip goes back to the base. */
    fun forget(): Job = scope.launch {
        clients.withLock {
            personal?.close()
            personal = null
            base?.personalization(storageDir)?.use { it.delete() }
        }
        _state.update { it.copy(personalized = false, learning = Learning.Idle, comparison = emptyList()) }
        refresh(_state.value.text, 0)
    }

    /**
     * Before/after view: walks the first [words] words of [heldOut] and records, before each word,
     * the base strip and the personal strip (empty personal strips without personal weights).
     */
    fun compare(heldOut: String, words: Int = 12): Job = scope.launch {
        val b = base ?: return@launch
        val p = personal
        val rows = mutableListOf<WordComparison>()
        val matches = Regex("[\\p{L}']+").findAll(heldOut)
        try {
            for (m in matches) {
                if (rows.size == words) break
                if (m.range.first == 0) continue // no context before the first word
                val before = heldOut.substring(0, m.range.first)
                if (!before.endsWith(" ")) continue // inside a word ("don't", "e-mail")
                rows += WordComparison(m.value, b.suggest(before, 3).words, p?.suggest(before, 3)?.words ?: emptyList())
            }
            _state.update { it.copy(comparison = rows.toList()) }
        } catch (e: SpaMobileException) {
            _state.update { it.copy(banner = describe(e)) }
        }
    }

    override fun close() {
        suggestJob?.cancel()
        learnJob?.cancel()
        personal?.close()
        base?.close()
        personal = null
        base = null
    }

    companion object {
        fun describe(e: SpaMobileException): String = when (e) {
            is SpaMobileException.Unauthorized -> "The server refused the API key."
            is SpaMobileException.Network -> "No connection to the suggestion server."
            is SpaMobileException.Storage -> "Could not save the personal model."
            is SpaMobileException.InvalidConfig -> "Not enough text to learn from, or bad settings: ${e.reason}"
            else -> "Suggestions are unavailable right now."
        }

        /** "top-3 31.6% → 35.2% · keys saved 46.9% → 49.0%" */
        fun summary(before: NextWordQuality, after: NextWordQuality): String =
            "top-3 ${"%.1f".format(before.top3)}% → ${"%.1f".format(after.top3)}% · " +
                "keys saved ${"%.1f".format(before.keystrokeSavings)}% → ${"%.1f".format(after.keystrokeSavings)}%"
    }
}

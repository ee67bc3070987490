// The chat sample's logic: plain Kotlin over the SDK's API (ai.spa.mobile) and kotlinx.coroutines,
// so it compiles and is tested on a JVM (sample-apps/jvm-test, run by scripts/test-ffi.sh).
// The Android UI (ChatScreen.kt) holds one instance inside an androidx ViewModel.
package ai.spa.sample.chat

import ai.spa.mobile.Chat
import ai.spa.mobile.SpaMobile
import ai.spa.mobile.ffi.GenerateParams
import ai.spa.mobile.ffi.GenerationStats
import ai.spa.mobile.ffi.Quantization
import ai.spa.mobile.ffi.SpaConfig
import ai.spa.mobile.ffi.SpaMobileException
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.Job
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.launch

/** What the settings screen edits. */
data class ChatSettings(
    val serverUrl: String,
    val apiKey: String,
    /** Extra trusted root (PEM), e.g. a development server's self-signed certificate. */
    val caCertPem: String? = null,
    /** The base model's GGUF on the device (tokenizer + LM head rows only). */
    val modelPath: String,
    /** Personal side weights from the keyboard demo's "learn from my writing", if any. */
    val personalWeightsPath: String? = null,
    /** 0: greedy. */
    val temperature: Float = 0f,
    val topP: Float = 0f,
    /** Draft length K: base tokens proposed per round. */
    val draftK: Int = 8,
    val maxTokens: Int = 256,
) {
    fun config() = SpaConfig(
        serverUrl = serverUrl,
        apiKey = apiKey,
        caCertPem = caCertPem,
        modelPath = modelPath,
        personalWeightsPath = personalWeightsPath,
        quantization = Quantization.Q8,
        threads = 0u,
        timeoutMs = 20_000u,
        maxAttempts = 3u,
    )

    fun params() = GenerateParams(
        maxTokens = maxTokens.coerceIn(1, 4096).toUInt(),
        draftK = draftK.coerceIn(1, 64).toUInt(),
        temperature = temperature,
        topP = topP,
        seed = 0uL,
    )
}

/** One bubble. [info] is the "how it was made" line of a finished answer. */
data class UiMessage(
    val id: Long,
    val fromUser: Boolean,
    val text: String,
    val streaming: Boolean = false,
    val info: String? = null,
    /** Set when the answer failed or was stopped; [text] keeps what had arrived. */
    val error: String? = null,
)

data class ChatUiState(
    val connected: Boolean = false,
    val connecting: Boolean = false,
    val personalized: Boolean = false,
    val messages: List<UiMessage> = emptyList(),
    val generating: Boolean = false,
    /** A problem to show above the input (connection, key, ...); null when all is well. */
    val banner: String? = null,
)

/**
 * The chat screen's state machine. All methods are safe to call from the UI thread; work runs in
 * [scope] (on Android: viewModelScope). [connector] is the SDK's connect, replaceable by apps that
 * manage one [SpaMobile] for several screens.
 */
class ChatViewModel(
    private val scope: CoroutineScope,
    private val connector: suspend (SpaConfig) -> SpaMobile = { SpaMobile.connect(it) },
) : AutoCloseable {
    private val _state = MutableStateFlow(ChatUiState())
    val state: StateFlow<ChatUiState> = _state.asStateFlow()

    private var settings: ChatSettings? = null
    private var spa: SpaMobile? = null
    private var chat: Chat? = null
    private var job: Job? = null
    private var nextId = 0L

    /** Connects (again) with [s]; the conversation starts over. */
    fun connect(s: ChatSettings): Job = scope.launch {
        job?.cancel()
        job?.join()
        release()
        settings = s
        _state.update { it.copy(connecting = true, connected = false, banner = null, messages = emptyList()) }
        try {
            val c = connector(s.config())
            spa = c
            chat = c.chat()
            _state.update { it.copy(connecting = false, connected = true, personalized = c.isPersonalized) }
        } catch (e: SpaMobileException) {
            _state.update { it.copy(connecting = false, connected = false, banner = describe(e)) }
        }
    }

    /** Sends [prompt]; the answer streams into a new bubble. Ignored while an answer is streaming. */
    fun send(prompt: String): Job? {
        val c = chat
        val s = settings
        if (prompt.isBlank() || _state.value.generating) return null
        if (c == null || s == null) {
            _state.update { it.copy(banner = "Not connected. Check the server in Settings.") }
            return null
        }
        val userId = nextId++
        val answerId = nextId++
        _state.update {
            it.copy(
                generating = true,
                banner = null,
                messages = it.messages + UiMessage(userId, true, prompt) + UiMessage(answerId, false, "", streaming = true),
            )
        }
        val j = scope.launch {
            try {
                c.stream(prompt, s.params()).collect { piece -> edit(answerId) { m -> m.copy(text = m.text + piece) } }
                val stats = c.lastStats
                edit(answerId) { it.copy(streaming = false, info = stats?.let(::howItWasMade)) }
            } catch (e: CancellationException) {
                edit(answerId) { it.copy(streaming = false, error = "Stopped") }
                throw e
            } catch (e: SpaMobileException) {
                edit(answerId) { it.copy(streaming = false, error = describe(e)) }
                if (e is SpaMobileException.Unauthorized || e is SpaMobileException.Network) {
                    _state.update { it.copy(banner = describe(e)) }
                }
            } finally {
                _state.update { it.copy(generating = false) }
            }
        }
        job = j
        return j
    }

    /** The stop button: ends the streaming answer (kept as far as it got, marked "Stopped"). */
    fun stop() {
        job?.cancel()
    }

    /** Starts a new conversation on the same connection. */
    fun newChat() {
        stop()
        chat?.close()
        chat = spa?.chat()
        _state.update { it.copy(messages = emptyList(), generating = false) }
    }

    private fun edit(id: Long, f: (UiMessage) -> UiMessage) =
        _state.update { st -> st.copy(messages = st.messages.map { if (it.id == id) f(it) else it }) }

    private fun release() {
        chat?.close()
        spa?.close()
        chat = null
        spa = null
    }

    override fun close() {
        job?.cancel()
        release()
    }

    companion object {
        /** The per-message line: rounds per token, side usage, network vs on-device time. */
        fun howItWasMade(st: GenerationStats): String =
            "${st.tokens} tokens · ${"%.2f".format(st.roundsPerToken)} rounds/token · " +
                "side ${"%.0f".format(100 * st.sideUsage)}% · network ${"%.0f".format(st.tNetMs)} ms · " +
                "on-device ${"%.0f".format(st.tOnDeviceMs)} ms"

        /** A message for people, never the raw error. */
        fun describe(e: SpaMobileException): String = when (e) {
            is SpaMobileException.Unauthorized -> "The server refused the API key. Check it in Settings."
            is SpaMobileException.Network -> "Can't reach the server. Check the connection and the server URL."
            is SpaMobileException.Server -> "The server had a problem. Try again in a moment."
            is SpaMobileException.Incompatible -> "This app's model files don't match the server's model."
            is SpaMobileException.InvalidConfig -> "The settings are not valid: ${e.reason}"
            is SpaMobileException.Model -> "The on-device model could not be loaded."
            is SpaMobileException.Storage -> "Could not read or write the app's files."
            is SpaMobileException.Cancelled -> "Stopped"
            else -> "Something went wrong."
        }
    }
}

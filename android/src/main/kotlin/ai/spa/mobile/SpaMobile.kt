// Idiomatic Kotlin API of spa-mobile over the UniFFI bindings in ai.spa.mobile.ffi
// (generated from rust/spa-ffi by scripts/test-ffi.sh). Reference: docs/kotlin.md; design:
// docs/mobile.md.
package ai.spa.mobile

import ai.spa.mobile.ffi.ChatMessage
import ai.spa.mobile.ffi.ConnectListener
import ai.spa.mobile.ffi.Conversation
import ai.spa.mobile.ffi.GenerateParams
import ai.spa.mobile.ffi.GenerationListener
import ai.spa.mobile.ffi.GenerationStats
import ai.spa.mobile.ffi.ModelManifest
import ai.spa.mobile.ffi.PersonalizationReport
import ai.spa.mobile.ffi.PersonalizeListener
import ai.spa.mobile.ffi.PersonalizeOptions
import ai.spa.mobile.ffi.Personalizer
import ai.spa.mobile.ffi.TrainProgress
import ai.spa.mobile.ffi.Reply
import ai.spa.mobile.ffi.SpaClient
import ai.spa.mobile.ffi.SpaConfig
import ai.spa.mobile.ffi.SpaMobileException
import ai.spa.mobile.ffi.Suggestions
import ai.spa.mobile.ffi.connectWithProgress
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.channels.trySendBlocking
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.callbackFlow

/**
 * A connection to an SPA base server plus the on-device half of the model.
 *
 * ```
 * import ai.spa.mobile.SpaMobile       // the wrapper: SpaMobile, Chat, Personalization
 * import ai.spa.mobile.ffi.SpaConfig   // generated records, enums and errors
 *
 * SpaMobile.connect(config).use { spa ->
 *     spa.chat().use { chat -> chat.stream("Hello!").collect { print(it) } }
 * }
 * ```
 * Every failure is a [SpaMobileException] subclass (Unauthorized, Network, Server, ...).
 * Suspend functions are main-safe: the work runs on the library's own threads.
 */
class SpaMobile private constructor(private val client: SpaClient) : AutoCloseable {
    companion object {
        /** Connects to the server and loads the device model (suspends; runs off the caller's thread). */
        suspend fun connect(config: SpaConfig): SpaMobile = SpaMobile(ai.spa.mobile.ffi.connect(config))

        /**
         * [connect], reporting the device pack's download (when [SpaConfig.modelPath] is null and
         * the pack is kept in [SpaConfig.devicePackDir]): [onDownload] gets the bytes on the
         * device and the pack's size, on a library thread (once with `done == total` when the
         * pack is already there). If it throws, connect fails with [SpaMobileException.Callback];
         * the bytes already downloaded are kept and the next connect resumes from them.
         */
        suspend fun connect(config: SpaConfig, onDownload: (done: ULong, total: ULong) -> Unit): SpaMobile {
            val report = onDownload
            return SpaMobile(connectWithProgress(config, object : ConnectListener {
                override fun onDownload(done: ULong, total: ULong) = report(done, total)
            }))
        }
    }

    /** What the server serves. */
    val manifest: ModelManifest get() = client.manifest()

    /** A new conversation (multi-turn chat). */
    fun chat(): Chat = Chat(client.conversation())

    /** Whether this connection runs personal weights. */
    val isPersonalized: Boolean get() = client.isPersonalized()

    /** Whether the suggestion strip uses the user's word cache (`personalWordsPath` was loaded). */
    val usesPersonalWords: Boolean get() = client.usesPersonalWords()

    /**
     * Up to [count] next-word suggestions for [textBeforeCursor] (a keyboard's suggestion strip;
     * a partly typed word is completed). Suspends for one request to the server.
     */
    suspend fun suggest(textBeforeCursor: String, count: Int = 3): Suggestions =
        client.suggest(textBeforeCursor, count.toUInt())

    /** Personalization with its weights in [storageDir] (e.g. `context.filesDir.path + "/spa"`). */
    fun personalization(storageDir: String): Personalization = Personalization(client.personalizer(storageDir))

    override fun close() = client.close()
}

/**
 * One conversation. Generations run one at a time. [conversation] is the bindings' object, for the
 * handle API (`start` -> `Generation` with `cancel()`/`finish()`).
 */
class Chat internal constructor(val conversation: Conversation) : AutoCloseable {
    /** Statistics of the last generation that completed (rounds/token, side usage, T_net, T_on-device). */
    @Volatile
    var lastStats: GenerationStats? = null
        private set

    /**
     * Streams the answer to [prompt] as text pieces. Cancelling the collector (e.g. `take(n)`,
     * leaving the scope) cancels the generation; errors are thrown as [SpaMobileException].
     */
    fun stream(prompt: String, params: GenerateParams = GenerateParams()): Flow<String> = callbackFlow {
        val generation = conversation.start(prompt, params, object : GenerationListener {
            override fun onToken(text: String) {
                // Blocks the library's generation thread while the collector is behind (backpressure).
                trySendBlocking(text)
            }

            override fun onDone(stats: GenerationStats) {
                lastStats = stats
                channel.close()
            }

            override fun onError(error: SpaMobileException) {
                channel.close(error)
            }
        })
        awaitClose {
            generation.cancel()
            generation.close()
        }
    }

    /**
     * Generates the whole answer (suspends); [onToken] sees the text as it streams, on a library
     * thread (not the caller's: post UI updates to the main thread, or use [stream]). Cancelling
     * the coroutine cancels the generation; if [onToken] throws, it ends with
     * [SpaMobileException.Callback].
     */
    suspend fun send(
        prompt: String,
        params: GenerateParams = GenerateParams(),
        onToken: (String) -> Unit = {},
    ): Reply {
        val reply = conversation.generate(prompt, params, object : GenerationListener {
            override fun onToken(text: String) = onToken(text)
            override fun onDone(stats: GenerationStats) {}
            override fun onError(error: SpaMobileException) {}
        })
        lastStats = reply.stats
        return reply
    }

    /** The messages so far (failed or cancelled turns are left out). */
    val history: List<ChatMessage> get() = conversation.history()

    /** Forgets the conversation. */
    suspend fun reset() = conversation.reset()

    override fun close() = conversation.close()
}

/**
 * Trains personal weights on the user's texts (on the device; the server only computes base
 * features of the token ids), learns the user's word cache, and keeps in app storage whichever
 * of base, word cache, side network and both saves the most keystrokes on the end of the
 * user's own text ([PersonalizationReport.shipped]). Connect again with
 * `personalWeightsPath = weightsPath` and `personalWordsPath = wordsPath` to use them (a
 * missing file is simply not used).
 */
class Personalization internal constructor(val personalizer: Personalizer) : AutoCloseable {
    /**
     * Trains, reports next-word quality of every candidate on [heldOut], and saves what ships
     * atomically. Cancelling the coroutine (or [cancel], which makes it throw
     * [SpaMobileException.Cancelled]) stops it and saves nothing. [onProgress] runs on a library
     * thread after each training step; if it throws, training stops with
     * [SpaMobileException.Callback].
     */
    suspend fun train(
        texts: List<String>,
        heldOut: List<String>,
        options: PersonalizeOptions = PersonalizeOptions(),
        onProgress: (TrainProgress) -> Unit = {},
    ): PersonalizationReport = personalizer.train(texts, heldOut, options, object : PersonalizeListener {
        override fun onProgress(progress: TrainProgress) = onProgress(progress)
    })

    /** Stops a running [train]. */
    fun cancel() = personalizer.cancel()

    /** Where the weights are saved. */
    val weightsPath: String get() = personalizer.weightsPath()

    /** Whether weights are saved. */
    val hasSavedWeights: Boolean get() = personalizer.hasSavedWeights()

    /** Where the word cache is saved. */
    val wordsPath: String get() = personalizer.wordsPath()

    /** Whether a word cache is saved. */
    val hasSavedWords: Boolean get() = personalizer.hasSavedWords()

    /** Deletes the saved weights and word cache (the bindings' `Personalizer.deleteWeights()`). */
    fun delete() = personalizer.deleteWeights()

    override fun close() = personalizer.close()
}

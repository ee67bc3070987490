// Where the keyboard demo keeps its files and how it reaches the server (shared by the input
// method and the personalization screen).
package ai.spa.sample.keyboard

import ai.spa.mobile.ffi.Quantization
import ai.spa.mobile.ffi.SpaConfig
import android.content.Context
import java.io.File

object KeyboardSetup {
    /** Replace with your server; 10.0.2.2 is the host machine seen from the emulator. */
    private const val SERVER_URL = "https://10.0.2.2:8443"
    private const val API_KEY = ""

    /** App-private storage of the personal weights: never backed up, never uploaded. */
    fun storageDir(context: Context): String = File(context.noBackupFilesDir, "spa").path

    fun config(context: Context) = SpaConfig(
        serverUrl = SERVER_URL,
        apiKey = API_KEY,
        caCertPem = null,
        // Only the tokenizer and LM head rows of the base model's GGUF are read on the device.
        modelPath = File(context.filesDir, "models/SmolLM2-135M-Instruct.Q4_1.gguf").path,
        personalWeightsPath = null,
        quantization = Quantization.Q8,
        threads = 2u,
        timeoutMs = 5_000u,
        maxAttempts = 2u,
    )
}

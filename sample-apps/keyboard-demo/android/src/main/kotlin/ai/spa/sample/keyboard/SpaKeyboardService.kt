// Input method skeleton: a suggestion strip (3 words from KeyboardViewModel) above a minimal
// letter grid, drawn with Compose inside an InputMethodService. A real keyboard would replace the
// grid; the strip logic stays in KeyboardViewModel (tested on the JVM). Needs the Android SDK.
package ai.spa.sample.keyboard

import android.inputmethodservice.InputMethodService
import android.view.View
import android.view.inputmethod.EditorInfo
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.padding
import androidx.compose.material3.FilledTonalButton
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.compose.ui.Modifier
import androidx.compose.ui.platform.ComposeView
import androidx.compose.ui.text.font.FontWeight
import androidx.compose.ui.unit.dp
import androidx.lifecycle.Lifecycle
import androidx.lifecycle.LifecycleOwner
import androidx.lifecycle.LifecycleRegistry
import androidx.lifecycle.compose.collectAsStateWithLifecycle
import androidx.lifecycle.lifecycleScope
import androidx.lifecycle.setViewTreeLifecycleOwner
import androidx.savedstate.SavedStateRegistry
import androidx.savedstate.SavedStateRegistryController
import androidx.savedstate.SavedStateRegistryOwner
import androidx.savedstate.setViewTreeSavedStateRegistryOwner

class SpaKeyboardService : InputMethodService(), LifecycleOwner, SavedStateRegistryOwner {
    private val registry = LifecycleRegistry(this)
    private val savedState = SavedStateRegistryController.create(this)
    override val lifecycle: Lifecycle get() = registry
    override val savedStateRegistry: SavedStateRegistry get() = savedState.savedStateRegistry

    private lateinit var vm: KeyboardViewModel

    override fun onCreate() {
        super.onCreate()
        savedState.performRestore(null)
        registry.handleLifecycleEvent(Lifecycle.Event.ON_CREATE)
        vm = KeyboardViewModel(lifecycleScope, KeyboardSetup.config(this), KeyboardSetup.storageDir(this))
        vm.start()
    }

    override fun onCreateInputView(): View {
        // Compose needs the owners on the IME window's decor view.
        window.window?.decorView?.let {
            it.setViewTreeLifecycleOwner(this)
            it.setViewTreeSavedStateRegistryOwner(this)
        }
        return ComposeView(this).apply {
            setContent { MaterialTheme { KeyboardUi(vm, ::type, ::pick) } }
        }
    }

    override fun onStartInputView(info: EditorInfo?, restarting: Boolean) {
        registry.handleLifecycleEvent(Lifecycle.Event.ON_RESUME)
        syncText()
    }

    override fun onFinishInputView(finishingInput: Boolean) {
        registry.handleLifecycleEvent(Lifecycle.Event.ON_PAUSE)
    }

    override fun onUpdateSelection(oldSelStart: Int, oldSelEnd: Int, newSelStart: Int, newSelEnd: Int, candidatesStart: Int, candidatesEnd: Int) {
        super.onUpdateSelection(oldSelStart, oldSelEnd, newSelStart, newSelEnd, candidatesStart, candidatesEnd)
        syncText()
    }

    /** The strip follows the text before the cursor (up to 1000 characters of it). */
    private fun syncText() {
        val before = currentInputConnection?.getTextBeforeCursor(1000, 0)?.toString() ?: return
        vm.onTextChanged(before)
    }

    private fun type(s: String) {
        currentInputConnection?.commitText(s, 1)
    }

    private fun pick(word: String) {
        currentInputConnection?.commitText(vm.pick(word), 1)
    }

    override fun onDestroy() {
        registry.handleLifecycleEvent(Lifecycle.Event.ON_DESTROY)
        vm.close()
        super.onDestroy()
    }
}

@Composable
private fun KeyboardUi(vm: KeyboardViewModel, type: (String) -> Unit, pick: (String) -> Unit) {
    val st by vm.state.collectAsStateWithLifecycle()
    Column(Modifier.fillMaxWidth().padding(4.dp)) {
        // The suggestion strip: bold when the personal side network chose the words.
        Row(Modifier.fillMaxWidth(), horizontalArrangement = Arrangement.SpaceEvenly) {
            st.suggestions.forEach { w ->
                TextButton(onClick = { pick(w) }) {
                    Text(w, fontWeight = if (st.suggestionsPersonal) FontWeight.Bold else FontWeight.Normal)
                }
            }
        }
        st.banner?.let { Text(it, style = MaterialTheme.typography.labelSmall) }
        for (row in listOf("qwertyuiop", "asdfghjkl'", "zxcvbnm,.")) {
            Row(Modifier.fillMaxWidth(), horizontalArrangement = Arrangement.SpaceEvenly) {
                row.forEach { c -> FilledTonalButton(onClick = { type(c.toString()) }) { Text(c.toString()) } }
            }
        }
        Row(Modifier.fillMaxWidth(), horizontalArrangement = Arrangement.SpaceEvenly) {
            FilledTonalButton(onClick = { type(" ") }, modifier = Modifier.weight(1f)) { Text("space") }
        }
    }
}

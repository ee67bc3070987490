// Keyboard extension skeleton (Xcode: a Custom Keyboard Extension target with RequestsOpenAccess =
// YES, since suggestions need the network). A suggestion strip of 3 words from KeyboardViewModel
// above a minimal letter grid; a real keyboard replaces the grid. Logic: KeyboardViewModel.swift
// (tested on Linux). The personal weights are shared with the app through an App Group container.
#if canImport(UIKit)
import UIKit
import SpaMobile
import SpaMobileFFI

enum KeyboardSetup {
    static let appGroup = "group.ai.spa.sample.keyboard" // replace with your App Group

    static var storageDir: String {
        FileManager.default.containerURL(forSecurityApplicationGroupIdentifier: appGroup)?
            .appendingPathComponent("spa").path ?? NSTemporaryDirectory()
    }

    static var config: SpaConfig {
        SpaConfig(serverUrl: "https://localhost:8443", apiKey: "", caCertPem: nil,
                  modelPath: Bundle.main.path(forResource: "SmolLM2-135M-Instruct.Q4_1", ofType: "gguf") ?? "",
                  personalWeightsPath: nil, quantization: .q8, threads: 2, timeoutMs: 5_000, maxAttempts: 2)
    }
}

final class KeyboardViewController: UIInputViewController {
    private let vm = KeyboardViewModel(config: KeyboardSetup.config, storageDir: KeyboardSetup.storageDir)
    private let strip = UIStackView()

    override func viewDidLoad() {
        super.viewDidLoad()
        strip.axis = .horizontal
        strip.distribution = .fillEqually
        let rows = ["qwertyuiop", "asdfghjkl'", "zxcvbnm,."].map { row -> UIStackView in
            let r = UIStackView(arrangedSubviews: row.map { c in key(String(c)) { [weak self] in self?.type(String(c)) } })
            r.distribution = .fillEqually
            return r
        }
        let space = key("space") { [weak self] in self?.type(" ") }
        let all = UIStackView(arrangedSubviews: [strip] + rows + [space])
        all.axis = .vertical
        all.spacing = 4
        all.translatesAutoresizingMaskIntoConstraints = false
        view.addSubview(all)
        NSLayoutConstraint.activate([
            all.leadingAnchor.constraint(equalTo: view.leadingAnchor, constant: 4),
            all.trailingAnchor.constraint(equalTo: view.trailingAnchor, constant: -4),
            all.topAnchor.constraint(equalTo: view.topAnchor, constant: 4),
            all.bottomAnchor.constraint(equalTo: view.bottomAnchor, constant: -4),
        ])
        vm.onChange = { [weak self] st in self?.show(st.suggestions, personal: st.suggestionsPersonal) }
        vm.start()
    }

    override func textDidChange(_ textInput: UITextInput?) {
        vm.textChanged(textDocumentProxy.documentContextBeforeInput ?? "")
    }

    private func type(_ s: String) {
        textDocumentProxy.insertText(s)
        vm.textChanged(textDocumentProxy.documentContextBeforeInput ?? "")
    }

    private func show(_ words: [String], personal: Bool) {
        strip.arrangedSubviews.forEach { $0.removeFromSuperview() }
        for w in words {
            let b = key(w) { [weak self] in
                guard let self else { return }
                self.textDocumentProxy.insertText(self.vm.pick(w))
            }
            // Bold when the personal side network chose the words.
            b.titleLabel?.font = personal ? .boldSystemFont(ofSize: 16) : .systemFont(ofSize: 16)
            strip.addArrangedSubview(b)
        }
    }

    private func key(_ title: String, _ action: @escaping () -> Void) -> UIButton {
        UIButton(type: .system, primaryAction: UIAction(title: title) { _ in action() })
    }
}
#endif

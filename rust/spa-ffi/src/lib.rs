//! UniFFI bindings (being built; see issue 6).

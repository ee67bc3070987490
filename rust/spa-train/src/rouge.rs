//! ROUGE-L (F1) matching the `rouge-score` package (being written).

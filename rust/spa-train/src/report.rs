//! `report.md` and the plots of `spa eval`: the paper's Tables 1-3 with the paper's numbers
//! beside ours, ROUGE-L vs rounds per token per method, and side usage per position.
//!
//! Plots are SVG written directly (a scatter and a line chart need no plotting library; the
//! text renders without font files).

use crate::eval::{paper, Results};
use std::fmt::Write;

fn f(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.2}"),
        _ => "–".into(),
    }
}

/// Renders the markdown report.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# SPA evaluation: profile `{}`\n", r.profile);
    let _ = writeln!(s, "Base: `{}`. Reproduce with `spa eval --profile {} --json results.json --report report.md`.\n", r.base, r.profile.split('-').next().unwrap_or("quick"));
    if let Some(p) = &r.settings {
        let _ = writeln!(
            s,
            "Per task: {} train / {} validation / {} test examples (hash split), sources cut to {} words; \
             side width {}, K = {}, top-{} shortlist; ladder methods {} steps, lr from {:?} on validation; \
             methods through the base: reduced profile ({} examples, <= {} tokens, {} steps, tasks {:?}).\n",
            p.n_train, p.n_val, p.n_test, p.max_words, p.width, p.draft, p.top_k, p.steps, p.lrs,
            p.basegrad_train, p.basegrad_max_len, p.basegrad_steps,
            p.basegrad_tasks.iter().map(|t| t.name()).collect::<Vec<_>>()
        );
    }
    // Table 3.
    let tasks = ["xsum", "wikilingua", "coqa", "squad"];
    let _ = writeln!(
        s,
        "## Table 3: ROUGE-L per task (ours [95% bootstrap interval] | paper)\n"
    );
    let _ = writeln!(
        s,
        "| method | XSum | CNN/DM → WikiLingua | CoQA | SciQ → SQuAD-shifts | rounds/token (M) | side usage % | override % | trainable params % |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for row in &r.table3 {
        let pap = paper::TABLE3.iter().find(|p| p.0 == row.method);
        let cell = |i: usize| {
            let mut ours = f(row.rouge_l.get(tasks[i]).copied());
            if let Some((lo, hi)) = row.rouge_l_ci95.get(tasks[i]) {
                ours = format!("{ours} [{lo:.2}, {hi:.2}]");
            }
            match pap {
                Some(p) => format!("{ours} \\| {:.2}", [p.1, p.2, p.3, p.4][i]),
                None => ours,
            }
        };
        let m = match pap {
            Some(p) => format!("{:.2} \\| {:.2}", row.rounds_per_token, p.5),
            None => format!("{:.2}", row.rounds_per_token),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.2} |",
            row.method,
            cell(0),
            cell(1),
            cell(2),
            cell(3),
            m,
            row.side_usage_pct,
            row.override_pct,
            row.trainable_params_pct
        );
    }
    let notes: Vec<String> = r
        .table3
        .iter()
        .filter(|x| !x.note.is_empty())
        .map(|x| format!("- `{}`: {}", x.method, x.note))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(s, "\n{}", notes.join("\n"));
    }
    let n_test: Vec<String> = tasks
        .iter()
        .filter_map(|t| {
            let ns: Vec<usize> = r
                .table3
                .iter()
                .filter_map(|x| x.n_test.get(*t).copied())
                .collect();
            let (lo, hi) = (ns.iter().min()?, ns.iter().max()?);
            Some(if lo == hi {
                format!("{t} {lo}")
            } else {
                format!("{t} {lo}-{hi}")
            })
        })
        .collect();
    if !n_test.is_empty() {
        let _ = writeln!(
            s,
            "\nTest examples per task (the same examples for every method): {}.",
            n_test.join(", ")
        );
    }
    if !r.paired.is_empty() {
        let _ = writeln!(
            s,
            "\n### Paired differences (same test examples, resampled jointly)\n"
        );
        let _ = writeln!(
            s,
            "| difference | task | n | mean ROUGE-L difference | 95% interval | interval excludes 0 |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for d in &r.paired {
            let (lo, hi) = d.ci95;
            let _ = writeln!(
                s,
                "| {} − {} | {} | {} | {:+.2} | [{:+.2}, {:+.2}] | {} |",
                d.a,
                d.b,
                d.task,
                d.n,
                d.mean_diff,
                lo,
                hi,
                if lo > 0.0 {
                    "yes (above)"
                } else if hi < 0.0 {
                    "yes (below)"
                } else {
                    "no"
                }
            );
        }
    }
    if let Some(spa) = r.table3.iter().find(|x| x.method == "spa") {
        if let Some(sp) = spa.rounds_per_token_speculative {
            let _ = writeln!(s, "\nSPA rounds/token under speculative drafting: {sp:.3} (the paper's SPA: 0.62-0.64).");
        }
    }
    if !r.rounds.is_empty() {
        let _ = writeln!(
            s,
            "\n### SPA through the real protocol (loopback HTTPS server + device runtime, trained gate)\n"
        );
        let _ = writeln!(
            s,
            "| task | K | taps | mean K asked | rounds/token | KiB down/token (prompt taps included) | side usage % | override % | prompts | tokens |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for x in &r.rounds {
            let k = match &x.k {
                serde_json::Value::String(v) => v.clone(),
                v => v.to_string(),
            };
            let _ = writeln!(
                s,
                "| {} | {k} | int{} | {:.1} | {:.3} | {:.1} | {:.1} | {:.1} | {} | {} |",
                x.task,
                x.tap_bits,
                x.mean_k,
                x.rounds_per_token,
                x.bytes_down_per_token / 1024.0,
                x.side_usage_pct,
                x.override_pct,
                x.prompts,
                x.tokens
            );
        }
    }
    // Table 2.
    let _ = writeln!(s, "\n## Table 2: 50 new tokens (ours | paper, LLaMA-7B)\n");
    let _ = writeln!(s, "| method | params % | on-device s | base s | network s | total s | M | ROUGE-L XSum | ROUGE-L CoQA |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for row in &r.table2 {
        let pap = paper::TABLE2.iter().find(|p| p.0 == row.method);
        let pp = |ours: String, i: usize| match pap {
            Some(p) => format!("{ours} \\| {:.2}", [p.1, p.2, p.3, p.4, p.5, p.6, p.7][i]),
            None => ours,
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {} | {} | {} | {} | {} |",
            row.method,
            pp(format!("{:.2}", row.params_pct), 0),
            pp(f(row.t_device_s), 1),
            row.t_pretrained_s,
            pp(format!("{:.2}", row.t_net_s), 2),
            pp(format!("{:.2}", row.t_total_s), 3),
            pp(format!("{:.2}", row.rounds_per_token), 4),
            pp(f(row.rouge_xsum), 5),
            pp(f(row.rouge_coqa), 6),
        );
    }
    // Table 1.
    let _ = writeln!(s, "\n## Table 1: side usage by side size (SPA)\n");
    if r.table1.is_empty() {
        let _ = writeln!(
            s,
            "Not run in this evaluation (no run of SPA at Table 1's widths on its tasks)."
        );
    } else {
        let _ = writeln!(s, "| size | width | side usage % (test generations) | side usage % (validation positions) | paper % | ROUGE-L |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
    }
    for row in &r.table1 {
        let rl: Vec<String> = row
            .rouge_l
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {} |",
            row.size,
            row.width,
            row.side_usage_pct,
            row.val_side_usage_pct,
            row.paper_side_usage_pct,
            rl.join(", ")
        );
    }
    let curves: Vec<String> = r
        .table3
        .iter()
        .flat_map(|row| {
            row.val_curve.iter().map(move |(task, c)| {
                let pts: Vec<String> = c.iter().map(|(st, l)| format!("{st}: {l:.3}")).collect();
                format!("- `{}` {task}: {}", row.method, pts.join(", "))
            })
        })
        .collect();
    if !curves.is_empty() {
        let _ = writeln!(
            s,
            "\n## Validation curves (step: validation loss, the run kept)\n\n{}",
            curves.join("\n")
        );
    }
    if !r.personalization.is_null() {
        let _ = writeln!(
            s,
            "\n## Personalization\n\n```json\n{}\n```",
            serde_json::to_string_pretty(&r.personalization).unwrap_or_default()
        );
    }
    let _ = writeln!(s, "\n## Plots\n\n![ROUGE-L vs rounds per token](rouge_vs_rounds.svg)\n\n![side usage per position](side_usage_by_position.svg)\n");
    let _ = writeln!(s, "## Notes\n");
    for n in &r.notes {
        let _ = writeln!(s, "- {n}");
    }
    let t: Vec<String> = r
        .timings
        .iter()
        .map(|(k, v)| format!("{k} {v:.0}"))
        .collect();
    let _ = writeln!(s, "- Wall time (s): {}", t.join(", "));
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

struct Chart {
    w: f64,
    h: f64,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
    log_x: bool,
    body: String,
}

impl Chart {
    const L: f64 = 70.0;
    const R: f64 = 20.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    fn px(&self, x: f64) -> f64 {
        let (a, b, v) = if self.log_x {
            (self.x0.ln(), self.x1.ln(), x.max(1e-9).ln())
        } else {
            (self.x0, self.x1, x)
        };
        Self::L + (v - a) / (b - a).max(1e-12) * (self.w - Self::L - Self::R)
    }
    fn py(&self, y: f64) -> f64 {
        self.h
            - Self::B
            - (y - self.y0) / (self.y1 - self.y0).max(1e-12) * (self.h - Self::T - Self::B)
    }
    fn frame(&mut self, title: &str, xl: &str, yl: &str, xticks: &[f64], yticks: &[f64]) {
        let (w, h) = (self.w, self.h);
        let mut b = String::new();
        let _ = write!(
            b,
            r#"<rect x="0" y="0" width="{w}" height="{h}" fill="white"/><text x="{}" y="22" font-family="sans-serif" font-size="15" text-anchor="middle">{}</text>"#,
            w / 2.0,
            esc(title)
        );
        let (l, r, t, bt) = (Self::L, w - Self::R, Self::T, h - Self::B);
        let _ = write!(
            b,
            r#"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="black"/>"#,
            r - l,
            bt - t
        );
        for &x in xticks {
            let p = self.px(x);
            let _ = write!(
                b,
                r##"<line x1="{p}" y1="{t}" x2="{p}" y2="{bt}" stroke="#ddd"/><text x="{p}" y="{}" font-family="sans-serif" font-size="11" text-anchor="middle">{x}</text>"##,
                bt + 15.0
            );
        }
        for &y in yticks {
            let p = self.py(y);
            let _ = write!(
                b,
                r##"<line x1="{l}" y1="{p}" x2="{r}" y2="{p}" stroke="#ddd"/><text x="{}" y="{}" font-family="sans-serif" font-size="11" text-anchor="end">{y}</text>"##,
                l - 5.0,
                p + 4.0
            );
        }
        let _ = write!(
            b,
            r#"<text x="{}" y="{}" font-family="sans-serif" font-size="12" text-anchor="middle">{}</text>"#,
            (l + r) / 2.0,
            h - 12.0,
            esc(xl)
        );
        let _ = write!(
            b,
            r#"<text x="16" y="{}" font-family="sans-serif" font-size="12" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
            (t + bt) / 2.0,
            (t + bt) / 2.0,
            esc(yl)
        );
        self.body.push_str(&b);
    }
    fn svg(self) -> String {
        format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" viewBox="0 0 {} {}">{}</svg>"#,
            self.w, self.h, self.w, self.h, self.body
        )
    }
}

fn nice_max(v: f64) -> f64 {
    let v = v.max(1e-6);
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * p {
            return m * p;
        }
    }
    10.0 * p
}

/// ROUGE-L (mean over the tasks each method ran) vs rounds per token (log scale), per method.
pub fn rouge_vs_rounds_svg(r: &Results) -> String {
    let pts: Vec<(String, f64, f64)> = r
        .table3
        .iter()
        .filter(|m| !m.rouge_l.is_empty())
        .map(|m| {
            let mean = m.rouge_l.values().sum::<f64>() / m.rouge_l.len() as f64;
            (m.method.clone(), m.rounds_per_token.max(0.01), mean)
        })
        .collect();
    let ymax = nice_max(pts.iter().map(|p| p.2).fold(1.0, f64::max) * 1.1);
    let mut c = Chart {
        w: 640.0,
        h: 420.0,
        x0: 0.01,
        x1: 100.0,
        y0: 0.0,
        y1: ymax,
        log_x: true,
        body: String::new(),
    };
    let yt: Vec<f64> = (0..=5)
        .map(|i| (ymax / 5.0 * i as f64 * 10.0).round() / 10.0)
        .collect();
    c.frame(
        "ROUGE-L vs rounds per token",
        "rounds per generated token (log)",
        "mean ROUGE-L (F1 x100)",
        &[0.01, 0.1, 1.0, 10.0, 100.0],
        &yt,
    );
    let colors = [
        "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#7f7f7f",
    ];
    for (i, (name, x, y)) in pts.iter().enumerate() {
        let (px, py) = (c.px(*x), c.py(*y));
        let col = colors[i % colors.len()];
        let _ = write!(
            c.body,
            r#"<circle cx="{px}" cy="{py}" r="6" fill="{col}"/><text x="{}" y="{}" font-family="sans-serif" font-size="12">{}</text>"#,
            px + 9.0,
            py + 4.0,
            esc(name)
        );
    }
    c.svg()
}

/// SPA's side usage (%) at each generated position.
pub fn side_usage_svg(r: &Results) -> String {
    let ys = &r.side_usage_by_position;
    let n = ys.len().max(2) as f64;
    let mut c = Chart {
        w: 640.0,
        h: 360.0,
        x0: 0.0,
        x1: n - 1.0,
        y0: 0.0,
        y1: 100.0,
        log_x: false,
        body: String::new(),
    };
    let step = (n / 5.0).ceil().max(1.0);
    let xt: Vec<f64> = (0..6)
        .map(|i| i as f64 * step)
        .filter(|&x| x <= n - 1.0)
        .collect();
    c.frame(
        "SPA side usage per generated position",
        "position in the generation",
        "side path used (%)",
        &xt,
        &[0.0, 25.0, 50.0, 75.0, 100.0],
    );
    let pts: Vec<String> = ys
        .iter()
        .enumerate()
        .map(|(i, y)| format!("{:.1},{:.1}", c.px(i as f64), c.py(*y)))
        .collect();
    let _ = write!(
        c.body,
        r##"<polyline points="{}" fill="none" stroke="#d62728" stroke-width="2"/>"##,
        pts.join(" ")
    );
    c.svg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::MethodRow;

    #[test]
    fn report_and_plots_render() {
        let mut r = Results::default();
        let mut m = MethodRow {
            method: "spa".into(),
            rounds_per_token: 0.2,
            ..Default::default()
        };
        m.rouge_l.insert("xsum".into(), 20.0);
        r.table3.push(m);
        r.side_usage_by_position = vec![10.0, 20.0, 50.0];
        let md = markdown(&r);
        assert!(md.contains("| spa | 20.00 \\| 36.52"), "{md}");
        // Intervals, test sizes and paired differences when the results have them.
        r.table3[0]
            .rouge_l_ci95
            .insert("xsum".into(), (17.5, 22.25));
        r.table3[0].n_test.insert("xsum".into(), 100);
        r.paired.push(crate::eval::PairedRow {
            a: "spa".into(),
            b: "base".into(),
            task: "xsum".into(),
            mean_diff: 1.5,
            ci95: (0.25, 2.75),
            n: 100,
        });
        let md = markdown(&r);
        assert!(
            md.contains("| spa | 20.00 [17.50, 22.25] \\| 36.52"),
            "{md}"
        );
        assert!(md.contains("xsum 100."), "{md}");
        assert!(
            md.contains("| spa − base | xsum | 100 | +1.50 | [+0.25, +2.75] | yes (above) |"),
            "{md}"
        );
        r.rounds.push(crate::eval::RoundsRow {
            k: "adaptive".into(),
            task: "xsum".into(),
            rounds_per_token: 0.25,
            bytes_down_per_token: 4096.0,
            mean_k: 5.5,
            side_usage_pct: 20.0,
            override_pct: 10.0,
            prompts: 3,
            tokens: 120,
            tap_bits: 4,
        });
        let md = markdown(&r);
        assert!(
            md.contains("| xsum | adaptive | int4 | 5.5 | 0.250 | 4.0 | 20.0 | 10.0 | 3 | 120 |"),
            "{md}"
        );
        let svg = rouge_vs_rounds_svg(&r);
        assert!(svg.starts_with("<svg") && svg.contains(">spa</text>"));
        assert!(side_usage_svg(&r).contains("<polyline"));
    }
}

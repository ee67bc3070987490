//! The quick evaluation profile on a small slice (what CI runs): every ladder method on every
//! task, real data, real base, real generations; checks the results' structure and ranges,
//! the bootstrap intervals and paired differences, and that the run files make the evaluation
//! resumable (a second run reuses them all; a deleted one is recomputed from the cached trained
//! network; `only_runs` leaves out what has no run file).
//! (LoRA / Adapter / full integration have their own tests in tests/basegrad.rs.)

use spa_train::eval::{self, EvalOptions, Profile};

#[test]
fn quick_profile_slice_produces_every_table() {
    let home = spa_model::paths::spa_home();
    let model = spa_model::paths::model_file(spa_model::paths::MODEL_FILE);
    assert!(
        model.exists(),
        "run `scripts/fetch-assets.sh model data` first"
    );
    let work = tempfile::tempdir().unwrap();
    let mut profile = Profile::quick().slice(0.1);
    profile.n_test = 2;
    let runs = work.path().join("runs");
    let opts = EvalOptions {
        profile: profile.clone(),
        spa_home: home,
        model,
        work_dir: work.path().to_path_buf(),
        skip_basegrad: true,
        quiet: true,
        runs_dir: Some(runs.clone()),
        only_runs: false,
    };
    let r = eval::run(&opts, &mut |l| eprintln!("{l}")).unwrap();
    let names: Vec<&str> = r.table3.iter().map(|m| m.method.as_str()).collect();
    assert_eq!(
        names,
        [
            "spa",
            "spa_int4",
            "spa_two_stage",
            "lst",
            "full_separation",
            "base"
        ]
    );
    for m in &r.table3 {
        assert_eq!(m.rouge_l.len(), 4, "{}: {:?}", m.method, m.rouge_l);
        assert_eq!(m.rouge_l_ci95.len(), 4, "{m:?}");
        for (task, &(lo, hi)) in &m.rouge_l_ci95 {
            let v = m.rouge_l[task];
            assert!(
                lo <= v + 1e-9 && v <= hi + 1e-9,
                "{}: {task} {v} [{lo}, {hi}]",
                m.method
            );
            assert_eq!(m.n_test[task], 2, "{m:?}");
        }
        assert!(
            m.rouge_l.values().all(|v| (0.0..=100.0).contains(v)),
            "{m:?}"
        );
        assert!(
            m.rounds_per_token > 0.0 && m.rounds_per_token <= 1.0,
            "{m:?}"
        );
    }
    let spa = &r.table3[0];
    assert!(spa.trainable_params > 0 && spa.trainable_params_pct < 5.0);
    // (initial, best) validation loss per task; the best only moves on a strict improvement
    // of an evaluation after training steps. The slice trains 2 steps per task, too few to
    // promise a gain on every task (XSum stays flat there), so: no task got worse, and the
    // tasks together improved (this fails when training does nothing).
    assert_eq!(spa.val_loss.len(), 4, "{:?}", spa.val_loss);
    let (initial, best) = spa
        .val_loss
        .values()
        .fold((0.0, 0.0), |(i, b), (vi, vb)| (i + vi, b + vb));
    assert!(
        best < initial - 1e-3,
        "SPA training did not lower the validation loss (sum over tasks {initial} -> {best}): {:?}",
        spa.val_loss
    );
    assert!(
        spa.val_loss.values().all(|(i, b)| b <= i),
        "{:?}",
        spa.val_loss
    );
    assert_eq!(
        r.table3[3].rounds_per_token, 1.0,
        "LST: one transmission per token"
    );
    assert_eq!(
        r.table1.iter().map(|t| t.width).collect::<Vec<_>>(),
        [32, 64, 128]
    );
    assert!(!r.side_usage_by_position.is_empty());
    assert_eq!(r.protocol_inputs.len(), 4);
    // SPA with int4 taps: the same trained network (the same validation figures), half the
    // taps' bytes down.
    let int4 = r.table3.iter().find(|x| x.method == "spa_int4").unwrap();
    assert_eq!(int4.val_loss, spa.val_loss);
    assert!(
        int4.bytes_per_token < 0.7 * spa.bytes_per_token,
        "int4 taps: {} bytes per token against {}",
        int4.bytes_per_token,
        spa.bytes_per_token
    );
    // Two-stage SPA: LST's network with a gate trained alone, the same architecture.
    let two = r
        .table3
        .iter()
        .find(|x| x.method == "spa_two_stage")
        .unwrap();
    assert_eq!(two.trainable_params, spa.trainable_params);
    // Paired differences: SPA minus the base and minus LST, SPA with int4 taps minus SPA, and
    // two-stage SPA minus LST and minus the base, on every task (full integration is skipped
    // here), on the same test examples, so the mean difference is the difference of the means.
    assert_eq!(r.paired.len(), 20, "{:?}", r.paired);
    for d in &r.paired {
        let mean = |m: &str| r.table3.iter().find(|x| x.method == m).unwrap().rouge_l[&d.task];
        assert!(
            (d.a == "spa" && ["base", "lst"].contains(&d.b.as_str()))
                || (d.a == "spa_int4" && d.b == "spa")
                || (d.a == "spa_two_stage" && ["base", "lst"].contains(&d.b.as_str())),
            "{d:?}"
        );
        assert_eq!(d.n, 2);
        assert!(
            (d.mean_diff - (mean(&d.a) - mean(&d.b))).abs() < 1e-9,
            "{d:?}"
        );
        assert!(
            d.ci95.0 <= d.mean_diff + 1e-9 && d.mean_diff <= d.ci95.1 + 1e-9,
            "{d:?}"
        );
    }
    // One run file per (task, method): 4 tasks x (spa, spa_int4, spa_two_stage, lst,
    // full_separation, base) and SPA at Table 1's other widths on XSum.
    let n_files = std::fs::read_dir(&runs).unwrap().count();
    assert_eq!(n_files, 26, "run files in {}", runs.display());
    // Resumed: every result comes from the run files, and the tables are the same.
    let again = eval::run(&opts, &mut |l| eprintln!("{l}")).unwrap();
    assert_eq!(again.table3, r.table3);
    assert_eq!(again.table1, r.table1);
    assert_eq!(again.paired, r.paired);
    assert!(
        again
            .notes
            .iter()
            .any(|n| n.contains("26 (task, method) results reused from finished runs, 0 computed")),
        "{:?}",
        again.notes
    );
    // A lost run is recomputed (from the cached trained network: no training) and agrees.
    let lst = runs.join("xsum-lst.json");
    let before = std::fs::read_to_string(&lst).unwrap();
    std::fs::remove_file(&lst).unwrap();
    let mut log = Vec::new();
    let third = eval::run(&opts, &mut |l| log.push(l.to_string())).unwrap();
    assert!(
        log.iter()
            .any(|l| l.contains("trained network loaded from")),
        "{log:?}"
    );
    assert!(!log.iter().any(|l| l.contains("training")), "{log:?}");
    let row = |r: &eval::Results, m: &str| r.table3.iter().find(|x| x.method == m).cloned();
    assert_eq!(
        row(&third, "lst").unwrap().rouge_l,
        row(&r, "lst").unwrap().rouge_l
    );
    let field = |s: &str, k: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()[k].clone();
    let after = std::fs::read_to_string(&lst).unwrap();
    for k in ["settings_hash", "rouge_l", "example_ids"] {
        assert_eq!(field(&after, k), field(&before, k), "{k}");
    }
    // Rebuilt from the run files alone: what has none is left out, and said so.
    std::fs::remove_file(runs.join("coqa-base.json")).unwrap();
    let only = EvalOptions {
        only_runs: true,
        ..opts.clone()
    };
    let rebuilt = eval::run(&only, &mut |l| eprintln!("{l}")).unwrap();
    assert_eq!(row(&rebuilt, "spa"), row(&r, "spa"));
    assert_eq!(row(&rebuilt, "base").unwrap().rouge_l.len(), 3);
    assert!(!runs.join("coqa-base.json").exists());
    assert!(
        rebuilt
            .notes
            .iter()
            .any(|n| n.contains("Left out") && n.contains("coqa base")),
        "{:?}",
        rebuilt.notes
    );
    let md = spa_train::report::markdown(&r);
    assert!(md.contains("Table 3") && md.contains("Table 1") && md.contains("Table 2"));
    let json = serde_json::to_value(&r).unwrap();
    for k in [
        "base",
        "profile",
        "table1",
        "table2",
        "table3",
        "personalization",
        "paired",
    ] {
        assert!(json.get(k).is_some(), "results.json lacks {k}");
    }
    for k in ["rouge_l_ci95", "n_test"] {
        assert!(json["table3"][0].get(k).is_some(), "table3 rows lack {k}");
    }
    assert!(
        md.contains("Paired differences") && md.contains("spa − base"),
        "{md}"
    );
}

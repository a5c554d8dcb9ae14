//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`, and the inputs of findings kept
//! in `fuzz/regressions/<target>/`) through the fuzz targets of `fuzz/src/lib.rs`, without
//! libFuzzer: what CI runs of the fuzzing (issue 11 item 6), since a libFuzzer build of every
//! target does not fit its time budget. `fuzz/run.sh SECONDS` fuzzes for real (nightly,
//! cargo-fuzz). This crate hosts the replay because it already depends on every parser fuzzed.

#[path = "../../fuzz/src/lib.rs"]
mod targets;

use std::path::Path;

#[test]
fn fuzz_corpus_replays_without_a_finding() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut total = 0;
    for (name, target) in targets::TARGETS {
        let mut n = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(rd) = std::fs::read_dir(fuzz.join(dir).join(name)) else {
                assert_ne!(dir, "corpus", "fuzz/corpus/{name} is missing");
                continue;
            };
            let mut files: Vec<_> = rd.map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files {
                let data = std::fs::read(&f).unwrap();
                // A panic names the input: the test fails with it.
                eprintln!("{name}: {}", f.display());
                target(&data);
                n += 1;
            }
        }
        assert!(n > 0, "no corpus for fuzz target {name}");
        total += n;
    }
    eprintln!(
        "replayed {total} inputs through {} targets",
        targets::TARGETS.len()
    );
}

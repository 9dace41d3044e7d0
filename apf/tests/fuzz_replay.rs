//! Replays the `working_set` fuzz target's checked-in corpus and every
//! crash it found through the same check the fuzz target runs, on the
//! stable toolchain: what CI runs instead of fuzzing. A missing or empty
//! corpus fails the test (a replay of nothing proves nothing).

#[path = "../../fuzz/checks/working_set.rs"]
mod working_set;

use std::path::{Path, PathBuf};

/// Every file under `fuzz/<kind>/<target>`; `None` if the directory does
/// not exist.
fn inputs(kind: &str, target: &str) -> Option<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz").join(kind).join(target);
    let entries = std::fs::read_dir(&dir).ok()?;
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("list the fuzz inputs").path()).collect();
    files.sort();
    Some(files)
}

#[test]
fn working_set_corpus_and_crashes_replay_clean() {
    let corpus = inputs("corpus", "working_set").expect("fuzz/corpus/working_set is missing");
    assert!(corpus.len() >= 8, "fuzz/corpus/working_set holds {} inputs: too few to replay", corpus.len());
    let crashes = inputs("artifacts", "working_set").unwrap_or_default();
    let mut accepted = 0;
    for path in corpus.iter().chain(&crashes) {
        let input = std::fs::read(path).expect("read a fuzz input");
        accepted += usize::from(apf::WorkingSet::decode(&input).is_ok());
        working_set::check(&input);
    }
    // The corpus reaches past every refusal to decoded sets.
    assert!(accepted >= 2, "only {accepted} inputs decode");
}

//! Replays the `wire` fuzz target's checked-in corpus and every crash it
//! found through the same checks the fuzz target runs, on the stable
//! toolchain: what CI runs instead of fuzzing. A missing or empty corpus
//! fails the test (a replay of nothing proves nothing).

#[path = "../../../fuzz/checks/wire.rs"]
mod checks;

use std::path::{Path, PathBuf};

/// Every file under `fuzz/<kind>/<target>`; `None` if the directory does
/// not exist.
fn inputs(kind: &str, target: &str) -> Option<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz").join(kind).join(target);
    let entries = std::fs::read_dir(&dir).ok()?;
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("list the fuzz inputs").path()).collect();
    files.sort();
    Some(files)
}

#[test]
fn wire_corpus_and_crashes_replay_clean() {
    let corpus = inputs("corpus", "wire").expect("fuzz/corpus/wire is missing");
    assert!(corpus.len() >= 10, "fuzz/corpus/wire holds {} inputs: too few to replay", corpus.len());
    let crashes = inputs("artifacts", "wire").unwrap_or_default();
    let mut requests = 0;
    for path in corpus.iter().chain(&crashes) {
        let bytes = std::fs::read(path).expect("read a fuzz input");
        if agent_proto::Request::decode(&bytes).is_ok() {
            requests += 1;
        }
        checks::check(&bytes);
    }
    // The corpus reaches past the refusals into every kind of request.
    assert!(requests >= 6, "only {requests} inputs decode as requests");
}

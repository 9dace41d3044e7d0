//! Replays the `handshake` fuzz target's checked-in corpus and every crash
//! it found through the same checks the fuzz target runs, on the stable
//! toolchain: what CI runs instead of fuzzing. A missing or small corpus
//! fails the test (a replay of nothing proves nothing).

#[path = "../../fuzz/checks/handshake.rs"]
mod handshake;

use std::path::{Path, PathBuf};

fn inputs(kind: &str) -> Option<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz").join(kind).join("handshake");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).ok()?.map(|e| e.expect("list the fuzz inputs").path()).collect();
    files.sort();
    Some(files)
}

#[test]
fn handshake_corpus_and_crashes_replay_clean() {
    let corpus = inputs("corpus").expect("fuzz/corpus/handshake is missing");
    assert!(corpus.len() >= 10, "fuzz/corpus/handshake holds {} inputs: too few to replay", corpus.len());
    let crashes = inputs("artifacts").unwrap_or_default();
    let mut accepted = 0;
    for path in corpus.iter().chain(&crashes) {
        let input = std::fs::read(path).expect("read a fuzz input");
        if let Some((len, msg)) = input.split_first_chunk::<8>() {
            accepted += usize::from(apf_handler::handshake::parse(msg, u64::from_le_bytes(*len)).is_ok());
        }
        handshake::check(&input);
    }
    // The corpus reaches past every refusal to accepted handshakes.
    assert!(accepted >= 3, "only {accepted} inputs are accepted handshakes");
}

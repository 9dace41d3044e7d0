//! The checked-in inputs of a fuzz target, for the stable tests that replay
//! them through the target's checks instead of fuzzing (what CI runs). A
//! missing or small corpus fails the test: a replay of nothing proves
//! nothing. Each replay test includes this file with `#[path]`.

use std::path::{Path, PathBuf};

/// Every file under `fuzz/<kind>/<target>`, sorted; `None` if the
/// directory does not exist.
fn inputs(fuzz: &Path, kind: &str, target: &str) -> Option<Vec<PathBuf>> {
    let entries = std::fs::read_dir(fuzz.join(kind).join(target)).ok()?;
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("list the fuzz inputs").path()).collect();
    files.sort();
    Some(files)
}

/// The corpus of `target` under the fuzz directory `fuzz` (at least `least`
/// inputs), then every crash it found, read.
pub fn replay(fuzz: &Path, target: &str, least: usize) -> Vec<Vec<u8>> {
    let corpus = inputs(fuzz, "corpus", target).unwrap_or_else(|| panic!("fuzz/corpus/{target} is missing"));
    assert!(corpus.len() >= least, "fuzz/corpus/{target} holds {} inputs: too few to replay", corpus.len());
    let crashes = inputs(fuzz, "artifacts", target).unwrap_or_default();
    corpus.iter().chain(&crashes).map(|p| std::fs::read(p).expect("read a fuzz input")).collect()
}

//! Replays the `working_set` fuzz target's checked-in corpus and every
//! crash it found through the same check the fuzz target runs, on the
//! stable toolchain: what CI runs instead of fuzzing. A missing or empty
//! corpus fails the test (a replay of nothing proves nothing).

#[path = "../../fuzz/checks/working_set.rs"]
mod working_set;

#[path = "../../fuzz/checks/corpus.rs"]
mod corpus;

#[test]
fn working_set_corpus_and_crashes_replay_clean() {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut accepted = 0;
    for input in corpus::replay(&fuzz, "working_set", 8) {
        accepted += usize::from(apf::WorkingSet::decode(&input).is_ok());
        working_set::check(&input);
    }
    // The corpus reaches past every refusal to decoded sets.
    assert!(accepted >= 2, "only {accepted} inputs decode");
}

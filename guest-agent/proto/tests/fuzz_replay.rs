//! Replays the `wire` fuzz target's checked-in corpus and every crash it
//! found through the same checks the fuzz target runs, on the stable
//! toolchain: what CI runs instead of fuzzing. A missing or empty corpus
//! fails the test (a replay of nothing proves nothing).

#[path = "../../../fuzz/checks/wire.rs"]
mod checks;

#[path = "../../../fuzz/checks/corpus.rs"]
mod corpus;

#[test]
fn wire_corpus_and_crashes_replay_clean() {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut requests = 0;
    for bytes in corpus::replay(&fuzz, "wire", 10) {
        if agent_proto::Request::decode(&bytes).is_ok() {
            requests += 1;
        }
        checks::check(&bytes);
    }
    // The corpus reaches past the refusals into every kind of request.
    assert!(requests >= 6, "only {requests} inputs decode as requests");
}

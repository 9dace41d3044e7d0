//! Replays the `handshake` fuzz target's checked-in corpus and every crash
//! it found through the same checks the fuzz target runs, on the stable
//! toolchain: what CI runs instead of fuzzing. A missing or small corpus
//! fails the test (a replay of nothing proves nothing).

#[path = "../../fuzz/checks/handshake.rs"]
mod handshake;

#[path = "../../fuzz/checks/corpus.rs"]
mod corpus;

#[test]
fn handshake_corpus_and_crashes_replay_clean() {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut accepted = 0;
    for input in corpus::replay(&fuzz, "handshake", 10) {
        if let Some((len, msg)) = input.split_first_chunk::<8>() {
            accepted += usize::from(apf_handler::handshake::parse(msg, u64::from_le_bytes(*len)).is_ok());
        }
        handshake::check(&input);
    }
    // The corpus reaches past every refusal to accepted handshakes.
    assert!(accepted >= 3, "only {accepted} inputs are accepted handshakes");
}
